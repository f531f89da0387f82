"""Fixed point and slots: quantise a clipped float vector, pack many values per plaintext.

numpy only. The error bound of the quantiser and the overflow headroom of the
layout are stated and checked here; :mod:`fedapp.crypto.vectors` relies on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_KEY_BITS = 2048


class LayoutError(ValueError):
    """A slot layout cannot hold the worst-case sum it is asked to hold."""


@dataclass(frozen=True)
class Quantizer:
    """Clip, then map each coordinate of ``[-bound, bound]`` to an integer in ``[0, 2^bits - 1]``.

    ``clip_norm`` > 0 first scales the whole vector to L2 norm <= ``clip_norm``;
    then every coordinate is clipped to ``[-bound, bound]``. With
    ``step = 2 bound / (2^bits - 1)``, round-to-nearest makes each coordinate
    off by at most ``step / 2``; stochastic rounding (unbiased) by less than
    ``step``. A weighted sum over total weight ``W`` is therefore within
    ``W * step / 2`` (resp. ``W * step``) of the weighted sum of the clipped
    vectors, and the weighted mean within ``step / 2`` (resp. ``step``) per
    coordinate: :meth:`error_bound`. Clipping itself is a change of the value,
    not an error of the encoding.

    Parameters
    ----------
    bound : float
        Per-coordinate bound B (default: 1.0).
    bits : int
        Bits per value, 2..32 (default: 16).
    clip_norm : float
        L2 clip applied first; 0 = none (default: 0.0).
    stochastic : bool
        Stochastic rounding instead of round-to-nearest (default: False).
    """

    bound: float = 1.0
    bits: int = 16
    clip_norm: float = 0.0
    stochastic: bool = False

    def __post_init__(self) -> None:
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ValueError(f"bound must be a positive finite number, got {self.bound}")
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bits must be in 2..32, got {self.bits}")
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {self.clip_norm}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        return 2.0 * self.bound / self.levels

    def error_bound(self, total_weight: int = 1) -> float:
        """Largest per-coordinate error of a weighted sum of ``total_weight`` (mean: pass 1)."""
        return total_weight * self.step * (1.0 if self.stochastic else 0.5)

    def clip(self, values: np.ndarray) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64).ravel()
        if self.clip_norm > 0:
            norm = float(np.linalg.norm(x))
            if norm > self.clip_norm:
                x = x * (self.clip_norm / norm)
        return np.clip(x, -self.bound, self.bound)

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Clipped values as non-negative integers (uint64) in ``[0, levels]``."""
        return self.quantize(self.clip(values), rng)

    def quantize(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Per-coordinate bound and rounding only (no L2 clip): codes in ``[0, levels]``."""
        x = np.clip(np.asarray(values, dtype=np.float64).ravel(), -self.bound, self.bound)
        scaled = (x + self.bound) / self.step
        if self.stochastic:
            rng = rng if rng is not None else np.random.default_rng()
            floor = np.floor(scaled)
            scaled = floor + (rng.random(scaled.shape) < (scaled - floor))
        else:
            scaled = np.rint(scaled)
        return np.clip(scaled, 0, self.levels).astype(np.uint64)

    def decode_sum(self, sums: np.ndarray, total_weight: int) -> np.ndarray:
        """Weighted sum of the original values from the weighted sum of codes (the offset removed)."""
        return np.asarray(sums, dtype=np.float64) * self.step - self.bound * total_weight


def distributed_noise_std(sigma_total: float, num_clients: int) -> float:
    """Per-client Gaussian std so that the sum over ``num_clients`` has std ``sigma_total``.

    Distributed DP: each client adds ``N(0, sigma_total^2 / n)`` before quantising.
    The guarantee is exact only while no noisy coordinate hits the quantiser's
    ``bound`` (clipping after noise is not post-processing of the sum), and it
    assumes all ``n`` clients are honest and none drops out.
    """
    if sigma_total < 0 or num_clients < 1:
        raise ValueError(f"need sigma_total >= 0 and num_clients >= 1, got {sigma_total}, {num_clients}")
    return sigma_total / math.sqrt(num_clients)


def _ceil_log2(x: int) -> int:
    return (x - 1).bit_length()


@dataclass(frozen=True)
class SlotLayout:
    """How quantised values sit in one plaintext: ``slots`` fields of ``slot_bits`` bits each.

    ``headroom = ceil(log2(max_clients * max_weight))`` bits above the ``bits``
    of one value, so the weighted sum of ``max_clients`` codes, each at most
    ``2^bits - 1`` with weight at most ``max_weight``, stays below ``2^slot_bits``
    and never carries into the next slot; ``slots * slot_bits <= key_bits - 1``
    keeps the packed integer below ``n`` (no wrap modulo ``n``).

    Parameters
    ----------
    bits : int
        Bits per quantised value (default: 16).
    max_clients : int
        Most contributions one aggregate may hold (default: 10).
    max_weight : int
        Largest integer weight of one contribution (default: 1).
    key_bits : int
        Bit length of ``n`` (default: 2048).
    """

    bits: int = 16
    max_clients: int = 10
    max_weight: int = 1
    key_bits: int = DEFAULT_KEY_BITS

    def __post_init__(self) -> None:
        if self.max_clients < 1 or self.max_weight < 1:
            raise LayoutError(f"max_clients and max_weight must be >= 1, got {self.max_clients}, {self.max_weight}")
        if self.slot_bits > 62:
            raise LayoutError(f"slot of {self.slot_bits} bits (bits {self.bits} + headroom {self.headroom}) exceeds 62")
        if self.slots < 1:
            raise LayoutError(f"a {self.key_bits}-bit key cannot hold one {self.slot_bits}-bit slot")
        if ((1 << self.bits) - 1) * self.max_total_weight >= (1 << self.slot_bits):
            raise LayoutError("worst-case sum overflows a slot")  # cannot happen with the headroom formula

    @property
    def headroom(self) -> int:
        return _ceil_log2(self.max_total_weight)

    @property
    def slot_bits(self) -> int:
        return self.bits + self.headroom

    @property
    def slots(self) -> int:
        return (self.key_bits - 1) // self.slot_bits

    @property
    def max_total_weight(self) -> int:
        return self.max_clients * self.max_weight

    def num_ciphertexts(self, num_values: int) -> int:
        return -(-num_values // self.slots)

    def check_total_weight(self, total_weight: int, num_contributions: int) -> None:
        """Refuse an aggregate that could overflow a slot (more clients or weight than planned)."""
        if num_contributions > self.max_clients or total_weight > self.max_total_weight:
            raise LayoutError(
                f"aggregate of {num_contributions} contributions with total weight {total_weight} exceeds the layout "
                f"(max_clients={self.max_clients}, max total weight={self.max_total_weight}): slots could overflow"
            )


def pack(codes: np.ndarray, layout: SlotLayout) -> list[int]:
    """Codes (< 2^slot_bits) into plaintext integers, slot ``i`` at bits ``[i s, (i+1) s)``."""
    codes = np.asarray(codes, dtype=np.uint64).ravel()
    k, s = layout.slots, layout.slot_bits
    padded = np.zeros(layout.num_ciphertexts(codes.size) * k, dtype=np.uint64)
    padded[: codes.size] = codes
    bits = ((padded[:, None] >> np.arange(s, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    rows = np.packbits(bits.reshape(-1, k * s), axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in rows]


def unpack(plaintexts: Sequence[int], num_values: int, layout: SlotLayout) -> np.ndarray:
    """Inverse of :func:`pack`: int64 slot values, first ``num_values`` of them."""
    k, s = layout.slots, layout.slot_bits
    nbytes = (k * s + 7) // 8
    raw = np.frombuffer(b"".join(int(m).to_bytes(nbytes, "little") for m in plaintexts), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(plaintexts), nbytes), axis=1, bitorder="little")[:, : k * s]
    weights = np.left_shift(np.int64(1), np.arange(s, dtype=np.int64))
    return (bits.reshape(-1, s).astype(np.int64) @ weights)[:num_values]


