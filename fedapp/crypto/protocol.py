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
from typing import Any

import numpy as np

from fedapp.crypto.fixedpoint import Quantizer, SlotLayout
from fedapp.crypto.keys import ObfuscatorPool, PrivateKey, PublicKey
from fedapp.crypto.vectors import CiphertextRejected, EncryptedVector, ReplayGuard, decrypt_slot_sums, encrypt_vector

SECAGG_MODE = "secagg.mode"  # "encrypt" (train, send ciphertexts) or "decrypt" (decrypt the sum)
SECAGG_ROUND = "secagg.round"
SECAGG_KEY_ID = "secagg.key_id"
SECAGG_TOTAL_WEIGHT = "secagg.total_weight"  # a decryptor's reply: total weight of the sum
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
