"""Paillier vectors for secure aggregation: keys, fixed point, packing, fast encryption.

numpy + phe (gmpy2 underneath) only; no Flower, no torch. Three modules, one
front door (import from ``fedapp.crypto``):

* :mod:`~fedapp.crypto.keys` -- key pair, key files, key id, obfuscators
  (phe's online path, the CRT path, a precomputed pool);
* :mod:`~fedapp.crypto.fixedpoint` -- clip + quantise with a stated error
  bound, slot layout with overflow headroom, packing;
* :mod:`~fedapp.crypto.vectors` -- encrypt a vector, add encrypted vectors
  (server), decrypt the aggregate (key holder), wire format and its checks.

Threat model (what this buys and what it does not)
--------------------------------------------------
The clients share one Paillier key pair; the server process only ever holds the
public key (:class:`PublicKey`). Clients send :class:`EncryptedVector` blobs; the
server multiplies ciphertexts (= adds plaintexts) with :func:`add_encrypted` and
hands the encrypted aggregate back to key-holding clients, which decrypt it with
:func:`decrypt_aggregate`. An honest-but-curious server therefore learns the
aggregate and public metadata (who sent, weights, sizes, timing), never one
client's update. It does NOT protect against: a server colluding with any
key-holding client (that client can decrypt every individual ciphertext the
server shows it); a malicious server that forwards one client's ciphertext
alone as the "aggregate" to a decryptor that returns plaintext (decryptors
check that the aggregate names at least ``min_contributors`` senders, which a
lying server can fake); malicious clients (a client may send any in-range
values; the fixed-point bound only limits how far); traffic analysis. Integrity
checks (:class:`CiphertextRejected`) catch corruption, stale rounds, replays,
wrong keys and wrong lengths; an active network attacker able to recompute the
SHA-256 digest is stopped by TLS and SuperNode authentication, not by this module.

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
