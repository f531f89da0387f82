"""Encrypted vectors: encrypt (client), add (server, public key only), decrypt (key holder), wire format.

Wire format: ``MAGIC | header length | header JSON | fixed-width ciphertexts |
SHA-256 of everything before``; the header carries key id, round, sender,
nonce, number of values, layout and quantiser, so that a receiver can refuse
what does not belong to this round and key (:class:`CiphertextRejected`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import gmpy2
import numpy as np

from fedapp.crypto.fixedpoint import LayoutError, Quantizer, SlotLayout, pack, unpack
from fedapp.crypto.keys import ObfuscatorPool, PrivateKey, PublicKey, make_obfuscators

# Flower's logger by name, without importing Flower here.
log = logging.getLogger("flwr").log

MAGIC = b"FAPV1"  # first bytes of every encrypted vector on the wire
_DIGEST_BYTES = 32


class CiphertextRejected(ValueError):
    """An encrypted vector was refused; ``reason`` is a short code, the message says why.

    Codes: ``malformed``, ``digest``, ``wrong_key``, ``stale_round``, ``replay``,
    ``wrong_length``, ``wrong_layout``, ``out_of_range``, ``too_few_contributors``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"ciphertext rejected ({reason}): {detail}")
        self.reason = reason


def encrypt_plaintexts(plaintexts: Sequence[int], public_key: PublicKey, obfuscators: Sequence[int]) -> list[int]:
    """``(1 + m n) * obf mod n^2`` for each packed plaintext ``m < n`` (g = n + 1, as phe)."""
    n, n2 = public_key.n, public_key.nsquare
    return [int((1 + gmpy2.mpz(m) * n) * obf % n2) for m, obf in zip(plaintexts, obfuscators, strict=True)]


@dataclass
class EncryptedVector:
    """Packed, encrypted vector plus what the receiver needs to validate and decode it.

    ``kind`` is ``"update"`` (one client's) or ``"aggregate"`` (a sum);
    ``weight`` the total integer weight folded in; ``contributors`` the senders
    summed. ``quantizer`` travels so that the decryptor decodes with the same step.
    """

    key_id: str
    round: int
    sender: str
    nonce: str
    num_values: int
    layout: SlotLayout
    quantizer: Quantizer
    ciphertexts: list[int]
    weight: int = 1
    kind: str = "update"
    contributors: list[str] = field(default_factory=list)

    def header(self) -> dict[str, Any]:
        head = {k: v for k, v in asdict(self).items() if k != "ciphertexts"}
        head["num_ciphertexts"] = len(self.ciphertexts)
        return head

    def to_bytes(self, public_key: PublicKey) -> bytes:
        """``MAGIC | len | header JSON | fixed-width ciphertexts | SHA-256 of all before``."""
        head = json.dumps(self.header(), sort_keys=True).encode()
        width = public_key.ciphertext_bytes
        body = b"".join(int(c).to_bytes(width, "big") for c in self.ciphertexts)
        blob = MAGIC + struct.pack(">I", len(head)) + head + body
        return blob + hashlib.sha256(blob).digest()

    def to_ndarray(self, public_key: PublicKey) -> np.ndarray:
        """As a uint8 array, the form Flower's ``NDArrays`` carries."""
        return np.frombuffer(self.to_bytes(public_key), dtype=np.uint8)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | np.ndarray,
        public_key: PublicKey,
        *,
        expected_round: int | None = None,
        expected_num_values: int | None = None,
        expected_layout: SlotLayout | None = None,
        replay_guard: ReplayGuard | None = None,
    ) -> EncryptedVector:
        """Parse and validate; any problem raises :class:`CiphertextRejected` with its reason."""
        blob = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        if len(blob) < len(MAGIC) + 4 + _DIGEST_BYTES or not blob.startswith(MAGIC):
            raise CiphertextRejected("malformed", "not an encrypted vector (bad magic or too short)")
        if hashlib.sha256(blob[:-_DIGEST_BYTES]).digest() != blob[-_DIGEST_BYTES:]:
            raise CiphertextRejected("digest", "SHA-256 digest does not match: bytes changed or truncated")
        (head_len,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        try:
            head = json.loads(blob[start : start + head_len])
            layout = SlotLayout(**head["layout"])
            quantizer = Quantizer(**head["quantizer"])
            msg = cls(
                key_id=str(head["key_id"]), round=int(head["round"]), sender=str(head["sender"]),
                nonce=str(head["nonce"]), num_values=int(head["num_values"]), layout=layout, quantizer=quantizer,
                ciphertexts=[], weight=int(head["weight"]), kind=str(head["kind"]),
                contributors=[str(c) for c in head["contributors"]],
            )
            declared = int(head["num_ciphertexts"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CiphertextRejected("malformed", f"bad header: {exc}") from exc
        if msg.key_id != public_key.key_id:
            raise CiphertextRejected("wrong_key", f"encrypted under key {msg.key_id}, expected {public_key.key_id}")
        if expected_round is not None and msg.round != expected_round:
            raise CiphertextRejected("stale_round", f"made for round {msg.round}, this is round {expected_round}")
        if expected_layout is not None and layout != expected_layout:
            raise CiphertextRejected("wrong_layout", f"layout {layout} differs from the expected {expected_layout}")
        if layout.key_bits != public_key.bits:
            raise CiphertextRejected("wrong_layout", f"layout for {layout.key_bits}-bit keys, key has {public_key.bits}")
        if expected_num_values is not None and msg.num_values != expected_num_values:
            raise CiphertextRejected("wrong_length", f"{msg.num_values} values, expected {expected_num_values}")
        width = public_key.ciphertext_bytes
        body = blob[start + head_len : -_DIGEST_BYTES]
        need = layout.num_ciphertexts(msg.num_values)
        if declared != need or len(body) != need * width:
            raise CiphertextRejected(
                "wrong_length", f"{len(body)} body bytes / {declared} ciphertexts for {msg.num_values} values, need {need}"
            )
        n, n2 = public_key.n, public_key.nsquare
        for i in range(need):
            c = int.from_bytes(body[i * width : (i + 1) * width], "big")
            if not 0 < c < n2 or gmpy2.gcd(c, n) != 1:
                raise CiphertextRejected("out_of_range", f"ciphertext {i} is not an element of Z*_(n^2)")
            msg.ciphertexts.append(c)
        if replay_guard is not None:
            replay_guard.check(msg)
        return msg


class ReplayGuard:
    """Remembers ``(key id, nonce)`` pairs seen in this run; a second sighting is a replay."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def check(self, msg: EncryptedVector) -> None:
        token = (msg.key_id, msg.nonce)
        if token in self.seen:
            raise CiphertextRejected("replay", f"nonce {msg.nonce} from {msg.sender} was already used")
        self.seen.add(token)


def encrypt_vector(
    values: np.ndarray,
    *,
    public_key: PublicKey,
    layout: SlotLayout,
    quantizer: Quantizer,
    server_round: int,
    sender: str,
    private_key: PrivateKey | None = None,
    pool: ObfuscatorPool | None = None,
    workers: int = 1,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> EncryptedVector:
    """Clip, (optionally noise,) quantise, pack and encrypt one client's update.

    Obfuscators come from ``pool`` while it has enough, else from the CRT path
    with ``private_key``, else from phe's public-key path.
    """
    if layout.bits != quantizer.bits or layout.key_bits != public_key.bits:
        raise ValueError(f"layout (bits {layout.bits}, key {layout.key_bits}) does not match quantizer/key")
    x = quantizer.clip(values)
    if noise_std > 0:
        rng = rng if rng is not None else np.random.default_rng()
        x = x + rng.normal(0.0, noise_std, x.size)
    plaintexts = pack(quantizer.quantize(x, rng), layout)
    if pool is not None and len(pool) >= len(plaintexts):
        obfuscators = pool.take(len(plaintexts))
    else:
        if pool is not None:
            log(logging.WARNING, "obfuscator pool holds %d < %d needed: computing online", len(pool), len(plaintexts))
        obfuscators = make_obfuscators(len(plaintexts), public_key=public_key, private_key=private_key, workers=workers)
    return EncryptedVector(
        key_id=public_key.key_id, round=server_round, sender=sender, nonce=secrets.token_hex(16), num_values=x.size,
        layout=layout, quantizer=quantizer, ciphertexts=encrypt_plaintexts(plaintexts, public_key, obfuscators),
        contributors=[sender],
    )


def add_encrypted(
    messages: Sequence[EncryptedVector], public_key: PublicKey, weights: Sequence[int] | None = None
) -> EncryptedVector:
    """Homomorphic weighted sum (server side, public key only): ``prod c_i^(w_i) mod n^2``.

    Messages must share key, round, length, layout and quantizer; the total
    weight and number of contributions are checked against the layout so that
    no slot can overflow. A client missing from ``messages`` (dropped) simply
    is not in the sum.
    """
    if not messages:
        raise ValueError("nothing to add")
    weights = [m.weight for m in messages] if weights is None else [int(w) for w in weights]
    if len(weights) != len(messages) or min(weights) < 1:
        raise ValueError("need one integer weight >= 1 per message")
    first = messages[0]
    for m in messages:
        if m.key_id != public_key.key_id:
            raise CiphertextRejected("wrong_key", f"{m.sender}: key {m.key_id}, expected {public_key.key_id}")
        same = (m.round, m.num_values, m.layout, m.quantizer) == (first.round, first.num_values, first.layout, first.quantizer)
        if not same:
            raise CiphertextRejected("wrong_layout", f"{m.sender}: round/length/layout differ from {first.sender}")
    first.layout.check_total_weight(sum(weights), sum(max(1, len(m.contributors)) for m in messages))
    n2 = public_key.nsquare
    total = [gmpy2.mpz(1)] * len(first.ciphertexts)
    for m, w in zip(messages, weights):
        if w > first.layout.max_weight and m.kind == "update":
            raise LayoutError(f"{m.sender}: weight {w} exceeds max_weight {first.layout.max_weight}")
        for i, c in enumerate(m.ciphertexts):
            total[i] = total[i] * (c if w == 1 else gmpy2.powmod(c, w, n2)) % n2
    return EncryptedVector(
        key_id=public_key.key_id, round=first.round, sender="server", nonce=secrets.token_hex(16),
        num_values=first.num_values, layout=first.layout, quantizer=first.quantizer,
        ciphertexts=[int(c) for c in total], weight=sum(weights), kind="aggregate",
        contributors=[c for m in messages for c in (m.contributors or [m.sender])],
    )


def decrypt_slot_sums(
    message: EncryptedVector, private_key: PrivateKey, *, min_contributors: int = 1
) -> tuple[np.ndarray, int]:
    """Key-holder side: the weighted sum of the contributors' fixed-point codes (int64) and its total weight.

    ``min_contributors`` (e.g. 2 or more) refuses to decrypt something that
    claims to sum fewer clients, so a decryptor is not a decryption oracle for
    one client's update; a lying server can still fake the list (module doc).
    """
    if message.key_id != private_key.key_id:
        raise CiphertextRejected("wrong_key", f"encrypted under {message.key_id}, this key is {private_key.key_id}")
    if len(set(message.contributors)) < min_contributors:
        raise CiphertextRejected(
            "too_few_contributors", f"{len(set(message.contributors))} contributors, need >= {min_contributors}"
        )
    plaintexts = [private_key.phe.raw_decrypt(int(c)) for c in message.ciphertexts]
    return unpack(plaintexts, message.num_values, message.layout), message.weight


def decrypt_aggregate(
    message: EncryptedVector, private_key: PrivateKey, *, min_contributors: int = 1
) -> tuple[np.ndarray, int]:
    """Key-holder side: the weighted sum of the contributors' (clipped, quantised) vectors and its total weight."""
    sums, weight = decrypt_slot_sums(message, private_key, min_contributors=min_contributors)
    return message.quantizer.decode_sum(sums, weight), weight
