"""What the Paillier server wrapper and the client side agree on: message keys and the two client steps.

Neutral ground (no Flower, no torch): :mod:`fedapp.secagg` (server) and the
ClientApp both import from here and never from each other.

Round ``t`` of the protocol:

1. ``configure_fit`` adds ``{SECAGG_MODE: "encrypt", SECAGG_ROUND: t, SECAGG_KEY_ID: id}``
   to every client's config. A client trains, then :func:`encrypt_update`
   turns ``new - global`` into one uint8 array (an :class:`EncryptedVector`).
2. The server validates and adds the ciphertexts (public key only).
3. Still inside ``aggregate_fit``, the server sends the encrypted sum to a few
   decryptor clients with ``{SECAGG_MODE: "decrypt"}``; :func:`decrypt_request`
   returns the weighted sum of the fixed-point codes (the smallest unsigned
   integer type that holds a slot: 4 bytes a value for the default layout,
   half of float64) and its total weight. The server cross-checks that the
   decryptors agree, turns codes into values (:func:`decode_decrypted`) and
   applies the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fedapp.crypto.contributions import (
    DecryptionMemory,
    DecryptionPolicy,
    contribution_set_digest,
    verified_contributions,
)
from fedapp.crypto.fixedpoint import Quantizer, SlotLayout, unpack
from fedapp.crypto.keys import ObfuscatorPool, PrivateKey, PublicKey
from fedapp.crypto.threshold import KeyShare, ThresholdParams, combine_partials
from fedapp.crypto.vectors import (
    CiphertextRejected,
    EncryptedVector,
    ReplayGuard,
    add_encrypted,
    decrypt_slot_sums,
    encrypt_vector,
)

SECAGG_MODE = "secagg.mode"  # "encrypt" (train, send ciphertexts) or "decrypt" (decrypt the sum)
SECAGG_ROUND = "secagg.round"
SECAGG_KEY_ID = "secagg.key_id"
SECAGG_TOTAL_WEIGHT = "secagg.total_weight"  # a decryptor's reply: total weight of the sum
SECAGG_SHARE_INDEX = "secagg.share_index"  # a threshold decryptor's reply: which key share it used
MODE_ENCRYPT = "encrypt"
MODE_DECRYPT = "decrypt"


@dataclass(frozen=True)
class SecAggSettings:
    """Layout, quantiser and decryption policy, the same on server and clients.

    Parameters
    ----------
    layout : SlotLayout
        Slots and headroom (max clients x max weight).
    quantizer : Quantizer
        Clip bound, bits, rounding.
    min_contributors : int
        A decryptor refuses a sum of fewer senders (default: 2).
    noise_std : float
        Per-client distributed DP noise std, before quantising (default: 0.0).
    """

    layout: SlotLayout
    quantizer: Quantizer
    min_contributors: int = 2
    noise_std: float = 0.0


def settings_for(secagg: Any, max_clients: int) -> SecAggSettings:
    """Settings from a :class:`fedapp.config.SecAggConfig` (duck-typed: crypto imports no config)."""
    import math

    noise_std = secagg.noise_sigma_total / math.sqrt(max_clients) if secagg.noise_sigma_total > 0 else 0.0
    return SecAggSettings(
        layout=SlotLayout(bits=secagg.bits, max_clients=max_clients, max_weight=secagg.max_weight, key_bits=secagg.key_bits),
        quantizer=Quantizer(bound=secagg.bound, bits=secagg.bits, clip_norm=secagg.clip_norm, stochastic=secagg.stochastic),
        min_contributors=secagg.min_contributors,
        noise_std=noise_std,
    )


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)


def unflatten(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """Split ``vector`` into arrays shaped (and typed) like ``like``."""
    out, start = [], 0
    for a in like:
        out.append(vector[start : start + a.size].reshape(a.shape).astype(a.dtype))
        start += a.size
    if start != vector.size:
        raise ValueError(f"vector of {vector.size} values does not fit arrays holding {start}")
    return out


def encrypt_update(
    old: list[np.ndarray],
    new: list[np.ndarray],
    *,
    server_round: int,
    sender: str,
    public_key: PublicKey,
    settings: SecAggSettings,
    private_key: PrivateKey | None = None,
    pool: ObfuscatorPool | None = None,
) -> list[np.ndarray]:
    """Client step 1: the update ``new - old`` as one encrypted uint8 array (Flower NDArrays)."""
    msg = encrypt_vector(
        flatten(new) - flatten(old), public_key=public_key, layout=settings.layout, quantizer=settings.quantizer,
        server_round=server_round, sender=sender, private_key=private_key, pool=pool, noise_std=settings.noise_std,
    )
    return [msg.to_ndarray(public_key)]


def decrypt_request(
    arrays: list[np.ndarray], *, server_round: int, private_key: PrivateKey, settings: SecAggSettings,
    replay_guard: ReplayGuard | None = None,
) -> tuple[list[np.ndarray], int]:
    """Client step 3 (decryptors): the weighted sum of the round's fixed-point codes and its total weight.

    Refuses (:class:`~fedapp.crypto.CiphertextRejected`) anything not an
    aggregate of this round under this key with at least ``min_contributors``.
    Codes, not floats, go back: they are exact (so two decryptors agree bit for
    bit) and fit in ``slot_bits`` bits, which keeps the decryptors' upload small.
    """
    if len(arrays) != 1:
        raise ValueError(f"a decryption request carries one array, got {len(arrays)}")
    msg = EncryptedVector.from_bytes(
        arrays[0], private_key.public_key, expected_round=server_round, expected_layout=settings.layout,
        replay_guard=replay_guard,
    )
    if msg.kind != "aggregate":
        raise ValueError(f"refusing to decrypt a single {msg.kind!r} from {msg.sender}")
    sums, weight = decrypt_slot_sums(msg, private_key, min_contributors=settings.min_contributors)
    return [sums.astype(code_dtype(settings.layout))], weight


def code_dtype(layout: SlotLayout) -> np.dtype:
    """The smallest unsigned integer type that holds one slot of ``layout``."""
    for dtype in (np.uint16, np.uint32, np.uint64):
        if layout.slot_bits <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    raise ValueError(f"slots of {layout.slot_bits} bits do not fit 64-bit integers")


def decode_decrypted(codes: np.ndarray, weight: int, *, num_values: int, settings: SecAggSettings) -> np.ndarray:
    """Server side of step 3: a decryptor's codes back to the weighted sum of the updates (float64).

    Checks the reply's type, length and range first, so a broken decryptor is
    refused with a reason instead of corrupting the model.
    """
    codes = np.asarray(codes)
    if codes.dtype != code_dtype(settings.layout) or codes.shape != (num_values,):
        raise CiphertextRejected(
            "malformed", f"decrypted sum of {codes.dtype} {codes.shape}, expected {code_dtype(settings.layout)} ({num_values},)"
        )
    if codes.size and int(codes.max()) >= 1 << settings.layout.slot_bits:
        raise CiphertextRejected("malformed", f"decrypted code above the {settings.layout.slot_bits}-bit slot")
    return settings.quantizer.decode_sum(codes.astype(np.int64), weight)


# --- threshold decryption (no client holds the whole private key) ---------------------------------


def encode_partials(values: Sequence[int], public_key: PublicKey) -> np.ndarray:
    """Partial decryptions (elements of ``Z_(n^2)``) as one uint8 array, fixed width each."""
    width = public_key.ciphertext_bytes
    return np.frombuffer(b"".join(int(v).to_bytes(width, "big") for v in values), dtype=np.uint8)


def decode_partials(array: np.ndarray, public_key: PublicKey, count: int) -> list[int]:
    """Inverse of :func:`encode_partials`; a reply of the wrong size is refused."""
    raw = np.asarray(array, dtype=np.uint8).tobytes()
    width = public_key.ciphertext_bytes
    if len(raw) != count * width:
        raise CiphertextRejected("malformed", f"partial decryption of {len(raw)} bytes, expected {count} x {width}")
    return [int.from_bytes(raw[i * width : (i + 1) * width], "big") for i in range(count)]


def threshold_partial_decrypt(
    arrays: Sequence[np.ndarray],
    *,
    share: KeyShare,
    policy: DecryptionPolicy,
    memory: DecryptionMemory,
    run_id: int,
    server_round: int,
    settings: SecAggSettings,
) -> np.ndarray:
    """Client step 3 with a key share: check the signed updates, sum them here, partially decrypt the sum.

    The request carries the individual signed ciphertexts
    (:func:`~fedapp.crypto.contributions.verified_contributions` refuses
    anything short of ``policy.min_contributors`` enrolled senders), so the
    server can neither relabel one update as a sum nor pad a sum with invented
    contributors; :class:`DecryptionMemory` refuses a second, different sum in
    the same round.
    """
    public_key = share.public_key
    messages = verified_contributions(
        arrays, public_key=public_key, policy=policy, run_id=run_id, server_round=server_round,
        layout=settings.layout,
    )
    memory.admit(run_id=run_id, server_round=server_round, set_digest=contribution_set_digest(messages, public_key))
    aggregate = add_encrypted(messages, public_key)
    return encode_partials(share.partial_decrypt(aggregate.ciphertexts), public_key)


def combine_threshold(
    partials: Mapping[int, Sequence[int]], aggregate: EncryptedVector, *, public_key: PublicKey,
    params: ThresholdParams, settings: SecAggSettings,
) -> np.ndarray:
    """Server side of step 3: ``t`` partial decryptions of ``aggregate`` -> the weighted sum of the updates.

    A wrong partial (a cheating or broken decryptor; no correctness proofs are
    built) yields a garbage plaintext, which sets bits above the packed slots:
    refused as ``bad_partial`` instead of corrupting the model.
    """
    plaintexts = combine_partials(partials, public_key, threshold=params.threshold, num_parties=params.num_parties)
    used_bits = settings.layout.slots * settings.layout.slot_bits
    if any(int(m) >> used_bits for m in plaintexts):
        raise CiphertextRejected("bad_partial", "the combined plaintext has bits above the slots: a partial is wrong")
    sums = unpack(plaintexts, aggregate.num_values, settings.layout)
    return settings.quantizer.decode_sum(sums, aggregate.weight)
