"""Paillier vectors for secure aggregation: keys, fixed point, packing, fast encryption.

numpy + phe (gmpy2 underneath) + ``cryptography`` (Ed25519) only; no Flower, no
torch. One front door for the vector layer (import from ``fedapp.crypto``);
the threshold and signing layers are imported from their modules:

* :mod:`~fedapp.crypto.keys` -- key pair, key files, key id, obfuscators
  (phe's online path, the CRT path, a precomputed pool);
* :mod:`~fedapp.crypto.fixedpoint` -- clip + quantise with a stated error
  bound, slot layout with overflow headroom, packing;
* :mod:`~fedapp.crypto.vectors` -- encrypt a vector, add encrypted vectors
  (server), decrypt the aggregate (key holder), wire format and its checks;
* :mod:`~fedapp.crypto.threshold` -- threshold Paillier: dealer, key shares,
  partial decryption, combination;
* :mod:`~fedapp.crypto.contributions` -- signed contributions, the decryptor's
  own policy and memory; :mod:`~fedapp.crypto.dealing` -- the dealt key folder.

Threat model (what this buys and what it does not)
--------------------------------------------------
Keys are dealt offline (:mod:`~fedapp.crypto.dealing`): each client holds one
share of a threshold Paillier key (:mod:`~fedapp.crypto.threshold`; any ``t`` of
``l`` decrypt), an Ed25519 key that signs its ciphertexts, and its own policy
(``min_contributors``); the server holds the public key only. The server
multiplies ciphertexts; decryptors receive the individual signed updates, check
them against their policy, multiply them themselves and return a partial
decryption (:mod:`~fedapp.crypto.contributions`). The server plus up to ``t - 1``
clients learn nothing about one update; relabelled or padded sums and a second
sum in the same round are refused by every honest decryptor. NOT protected:
``t`` or more colluding clients (they hold the key); two disjoint groups of
decryptors asked for two different sums, unless ``2 t > l`` or every sum must
hold all clients (warned at start-up); malicious clients: a client may encrypt
any plaintext below ``n``, which can carry into neighbouring slots and move the
sum arbitrarily (the fixed-point bound limits honest clients only; a robust rule
cannot run on ciphertexts); wrong partial decryptions (no correctness proofs:
garbage is detected by the slot check, a crafted shift is not); traffic
analysis. The legacy single-key mode (``python -m fedapp.keys generate``) gives
every client the whole private key and is refused wherever a DP guarantee rests
on it. Integrity checks (:class:`CiphertextRejected`) catch corruption, stale
rounds, replays, wrong keys and wrong lengths.

What phe provides and what is written here
------------------------------------------
phe provides key generation (:func:`phe.paillier.generate_paillier_keypair`),
one-integer encryption (``raw_encrypt``) and CRT decryption (``raw_decrypt``).
Written here, because phe lacks it: key files and a key id; fixed-point
quantisation with an explicit error bound; a slot layout with overflow headroom;
packing many slots into one plaintext; a vectorised encryption path that uses
the factorisation (clients hold it) to compute the obfuscator ``r^n mod n^2``
about 3x faster, and a pool of obfuscators precomputed off the critical path;
an authenticated-by-digest wire format with round, key id and nonce.

Why the CRT obfuscator has exactly phe's distribution: for ``r`` uniform in
``Z_n*``, ``r^n mod p^2`` is the Teichmueller lift ``w(a) = a^p mod p^2`` of
``a = r^q mod p``, uniform in ``Z_p*`` because ``gcd(q, p-1) = 1`` (Paillier's
``gcd(n, phi(n)) = 1``); likewise mod ``q^2``, independently by the CRT. So
``CRT(a^p mod p^2, b^q mod q^2)`` with ``a, b`` uniform is distributed as
``r^n mod n^2``, at a 1024-bit exponent modulo a 2048-bit number instead of a
2048-bit exponent modulo a 4096-bit one.
"""

from fedapp.crypto.fixedpoint import LayoutError, Quantizer, SlotLayout, distributed_noise_std, pack, unpack
from fedapp.crypto.keys import (
    DEFAULT_KEY_BITS,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    ObfuscatorPool,
    PrivateKey,
    PublicKey,
    assert_no_private_key,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_key,
    make_obfuscators,
    save_keypair,
)
from fedapp.crypto.vectors import (
    CiphertextRejected,
    EncryptedVector,
    ReplayGuard,
    add_encrypted,
    decrypt_aggregate,
    decrypt_slot_sums,
    encrypt_plaintexts,
    encrypt_vector,
)

__all__ = [
    "DEFAULT_KEY_BITS", "PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "CiphertextRejected", "EncryptedVector", "LayoutError",
    "ObfuscatorPool", "PrivateKey", "PublicKey", "Quantizer", "ReplayGuard", "SlotLayout", "add_encrypted",
    "assert_no_private_key", "decrypt_aggregate", "decrypt_slot_sums", "distributed_noise_std", "encrypt_plaintexts", "encrypt_vector",
    "generate_keypair", "key_fingerprint", "load_private_key", "load_public_key", "make_obfuscators", "pack",
    "save_keypair", "unpack",
]
