"""Signed contributions and the decryptor's own policy: what makes a sum verifiable.

Threat: the server (or a client it colludes with) builds something that is not
an honest sum of at least ``m`` clients' updates -- one client's ciphertext
relabelled as a sum, a sum padded with invented contributors, or two
overlapping sums in one round whose difference is one client's update -- and
asks key-share holders to decrypt it.

Defence, on the decryptor (client) side only, so a lying server cannot talk
its way round it:

1. Each client signs (Ed25519, its enrolled key) the SHA-256 of its encrypted
   update together with the run id, the round, its id and the Paillier key id
   (:func:`sign_contribution`).
2. A decryption request carries the individual signed ciphertexts, not a sum.
   The decryptor checks every signature against its enrolment roster, needs at
   least ``min_contributors`` distinct enrolled senders of this run and round,
   and multiplies the ciphertexts itself (:func:`verified_contributions`).
3. It remembers, per run and round, which set it helped decrypt and refuses a
   second, different set (:class:`DecryptionMemory`).
4. ``min_contributors`` and the roster come from the client's own key folder
   (:class:`DecryptionPolicy`, written when keys are dealt), never from the
   server's run configuration.

What remains: (3) binds each honest decryptor; two *disjoint* groups of ``t``
decryptors could still be asked for two different sums unless ``2 t > l`` or
every sum must hold all ``l`` clients (``min_contributors == l``);
:meth:`DecryptionPolicy.differencing_safe` says which, and the start-up check
warns. A client that signs garbage is still a contributor (robustness, not
privacy, handles it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedapp.crypto.fixedpoint import SlotLayout
from fedapp.crypto.keys import PublicKey
from fedapp.crypto.vectors import CiphertextRejected, EncryptedVector

ROSTER_FILE = "roster.json"
POLICY_FILE = "policy.json"
SIGNING_KEY_FILE = "signing_key.pem"
_DOMAIN = b"fedapp/contribution/v1"


def contribution_digest(*, run_id: int, server_round: int, key_id: str, sender: str, blob: bytes) -> bytes:
    """What a client signs: a domain tag, run, round, key id, sender and the ciphertext's SHA-256."""
    head = json.dumps(
        {"run": int(run_id), "round": int(server_round), "key_id": key_id, "sender": str(sender)}, sort_keys=True
    ).encode()
    return hashlib.sha256(_DOMAIN + b"|" + head + b"|" + hashlib.sha256(blob).digest()).digest()


def sign_contribution(
    signing_key: Ed25519PrivateKey, *, run_id: int, server_round: int, key_id: str, sender: str, blob: bytes
) -> np.ndarray:
    """The Ed25519 signature of :func:`contribution_digest`, as a uint8 array for Flower's NDArrays."""
    digest = contribution_digest(run_id=run_id, server_round=server_round, key_id=key_id, sender=sender, blob=blob)
    return np.frombuffer(signing_key.sign(digest), dtype=np.uint8)


@dataclass(frozen=True)
class DecryptionPolicy:
    """A key-share holder's own rules, read from its key folder (never from the server).

    Parameters
    ----------
    min_contributors : int
        Distinct enrolled senders a sum must hold before this client helps decrypt it.
    threshold : int
        Key shares needed to decrypt (t).
    num_parties : int
        Key shares dealt (l).
    roster : dict[str, Ed25519PublicKey]
        Enrolled client id -> its contribution-signing public key.
    """

    min_contributors: int
    threshold: int
    num_parties: int
    roster: dict[str, Ed25519PublicKey] = field(repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.num_parties:
            raise ValueError(f"threshold must be in [1, {self.num_parties}], got {self.threshold}")
        if not self.threshold < self.min_contributors <= len(self.roster):
            raise ValueError(
                f"min_contributors must be in [threshold + 1 = {self.threshold + 1}, {len(self.roster)} enrolled "
                f"clients], got {self.min_contributors}: with m <= t, t - 1 colluding clients could sign zero "
                "updates and make a sum of m hold one honest update"
            )

    def differencing_safe(self) -> bool:
        """Whether no two different sums can be decrypted in one round by honest decryptors.

        Any two groups of ``t`` decryptors share one when ``2 t > l``; with
        ``min_contributors == l`` only one sum (all clients) exists.
        """
        return differencing_safe(
            threshold=self.threshold, num_parties=self.num_parties, min_contributors=self.min_contributors,
            enrolled=len(self.roster),
        )


def differencing_safe(*, threshold: int, num_parties: int, min_contributors: int, enrolled: int) -> bool:
    """Any two groups of ``threshold`` decryptors share one (``2 t > l``), or every sum must hold all clients."""
    return 2 * threshold > num_parties or min_contributors >= enrolled


def write_roster(directory: str | Path, roster: dict[str, Ed25519PublicKey]) -> Path:
    """The enrolment roster (public keys only) as JSON in ``directory``."""
    path = Path(directory) / ROSTER_FILE
    raw = {
        cid: key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        for cid, key in sorted(roster.items())
    }
    path.write_text(json.dumps(raw, indent=1))
    return path


def read_roster(directory: str | Path) -> dict[str, Ed25519PublicKey]:
    raw = json.loads((Path(directory) / ROSTER_FILE).read_text())
    return {str(cid): Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey)) for cid, hexkey in raw.items()}


def write_signing_key(directory: str | Path, key: Ed25519PrivateKey) -> Path:
    """A client's contribution-signing key, PEM, mode 0600."""
    path = Path(directory) / SIGNING_KEY_FILE
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return path


def read_signing_key(directory: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((Path(directory) / SIGNING_KEY_FILE).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{directory}/{SIGNING_KEY_FILE} is not an Ed25519 key")
    return key


def write_policy(directory: str | Path, *, min_contributors: int, threshold: int, num_parties: int) -> Path:
    path = Path(directory) / POLICY_FILE
    path.write_text(json.dumps({"min_contributors": min_contributors, "threshold": threshold, "num_parties": num_parties}))
    return path


def read_policy(directory: str | Path, roster: dict[str, Ed25519PublicKey]) -> DecryptionPolicy:
    raw = json.loads((Path(directory) / POLICY_FILE).read_text())
    return DecryptionPolicy(
        min_contributors=int(raw["min_contributors"]), threshold=int(raw["threshold"]),
        num_parties=int(raw["num_parties"]), roster=roster,
    )


def verified_contributions(
    arrays: Sequence[np.ndarray],
    *,
    public_key: PublicKey,
    policy: DecryptionPolicy,
    run_id: int,
    server_round: int,
    layout: SlotLayout,
) -> list[EncryptedVector]:
    """The signed updates of a decryption request, each checked; refuses anything short of an honest sum.

    ``arrays`` alternates ciphertext blob and signature. Refused
    (:class:`CiphertextRejected`): an odd count, a blob that is not one
    client's update of this round under this key, an unknown sender, a bad
    signature, the same sender twice, and fewer than ``min_contributors``.
    """
    if len(arrays) % 2:
        raise CiphertextRejected("malformed", f"{len(arrays)} arrays: expected (ciphertext, signature) pairs")
    messages: list[EncryptedVector] = []
    senders: set[str] = set()
    for blob_array, signature in zip(arrays[0::2], arrays[1::2]):
        blob = np.asarray(blob_array, dtype=np.uint8).tobytes()
        msg = EncryptedVector.from_bytes(blob, public_key, expected_round=server_round, expected_layout=layout)
        if msg.kind != "update":
            raise CiphertextRejected("not_an_update", f"a {msg.kind!r} from {msg.sender}: decryptors sum updates themselves")
        enrolled = policy.roster.get(msg.sender)
        if enrolled is None:
            raise CiphertextRejected("unknown_sender", f"{msg.sender!r} is not an enrolled client")
        digest = contribution_digest(
            run_id=run_id, server_round=server_round, key_id=public_key.key_id, sender=msg.sender, blob=blob
        )
        try:
            enrolled.verify(np.asarray(signature, dtype=np.uint8).tobytes(), digest)
        except InvalidSignature as err:
            raise CiphertextRejected("bad_signature", f"{msg.sender}'s signature does not verify") from err
        if msg.sender in senders:
            raise CiphertextRejected("duplicate_sender", f"{msg.sender} appears twice in one sum")
        senders.add(msg.sender)
        messages.append(msg)
    if len(senders) < policy.min_contributors:
        raise CiphertextRejected(
            "too_few_contributors",
            f"{len(senders)} signed contributors, this client's policy needs >= {policy.min_contributors}",
        )
    return messages


def contribution_set_digest(messages: Sequence[EncryptedVector], public_key: PublicKey) -> str:
    """One name for a set of contributions, independent of their order."""
    parts = sorted(f"{m.sender}:{hashlib.sha256(m.to_bytes(public_key)).hexdigest()}" for m in messages)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class DecryptionMemory:
    """Which contribution set this decryptor helped decrypt in each round of each run.

    Backed by a plain dict (the ClientApp keeps it beside its key share,
    :func:`fedapp.crypto.dealing.save_party_state`). Asking again for the same
    set (a retry) is fine; a different set in the same round is refused.
    """

    def __init__(self, seen: dict[str, str] | None = None) -> None:
        self.seen = dict(seen or {})

    def admit(self, *, run_id: int, server_round: int, set_digest: str) -> None:
        slot = f"{int(run_id)}:{int(server_round)}"
        previous = self.seen.get(slot)
        if previous is not None and previous != set_digest:
            raise CiphertextRejected(
                "second_sum", f"already helped decrypt another sum in round {server_round}: refusing a second one"
            )
        self.seen[slot] = set_digest


class ContributionGate:
    """The last round this client signed a contribution for, per run: at most one per round, rounds increasing.

    Without it a server could ask one client twice in a round and have two
    sums decrypted (by disjoint groups of decryptors, each remembering only its
    own answer) that differ only in that client's update, the other clients'
    noise shares cancelling. Backed by a plain dict (kept beside the key share
    by the ClientApp).
    """

    def __init__(self, last: dict[str, int] | None = None) -> None:
        self.last = {str(k): int(v) for k, v in (last or {}).items()}

    def claim(self, *, run_id: int, server_round: int) -> None:
        previous = self.last.get(str(int(run_id)), 0)
        if server_round <= previous:
            raise CiphertextRejected(
                "second_contribution",
                f"already signed a contribution for round {previous} of run {run_id}; refusing one for round "
                f"{server_round}",
            )
        self.last[str(int(run_id))] = int(server_round)
