"""Dealing a federation's keys offline: threshold Paillier shares, signing keys, each client's own policy.

``python -m fedapp.keys deal`` calls :func:`deal_federation` once, outside every
federated process, and then the dealer's memory (p, q, d) is gone. The key
folder it writes::

    KEY_DIR/paillier_public.json      public key              (server and every client)
    KEY_DIR/paillier_threshold.json   t and l                 (server and every client)
    KEY_DIR/roster.json               enrolled signing keys   (every client)
    KEY_DIR/party-<id>/share-<id+1>.json   key share     0600 (client <id> only)
    KEY_DIR/party-<id>/signing_key.pem     Ed25519 key   0600 (client <id> only)
    KEY_DIR/party-<id>/policy.json         min_contributors, t, l (client <id> only)

A deployment copies the three public files plus ``party-<id>/`` to client
``<id>`` and the first two to the server. For simplicity the dealer also makes
the signing keys; a federation that wants each client to make its own key
writes its public half into ``roster.json`` instead (the format is plain hex).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedapp.crypto.contributions import (
    DecryptionPolicy,
    read_policy,
    read_roster,
    read_signing_key,
    write_policy,
    write_roster,
    write_signing_key,
)
from fedapp.crypto.keys import PublicKey, load_public_key, save_keypair
from fedapp.crypto.threshold import (
    PARAMS_FILE,
    KeyShare,
    ThresholdParams,
    deal_threshold_key,
    load_share,
    load_threshold_params,
    save_shares,
    share_file_name,
)


def party_dir(key_dir: str | Path, partition_id: int) -> Path:
    """Client ``partition_id``'s private folder inside ``key_dir``."""
    return Path(key_dir) / f"party-{int(partition_id)}"


def is_threshold_key_dir(key_dir: str | Path) -> bool:
    """Whether ``key_dir`` was dealt with threshold shares (else it is a single-key pair)."""
    return (Path(key_dir) / PARAMS_FILE).exists()


@dataclass(frozen=True)
class Party:
    """Everything one client holds: its key share, its signing key and its own decryption policy."""

    sender: str
    public_key: PublicKey
    share: KeyShare
    signing_key: Ed25519PrivateKey
    policy: DecryptionPolicy

    def __repr__(self) -> str:
        return f"Party(sender={self.sender}, key_id={self.public_key.key_id}, share={self.share.index})"


def deal_federation(
    key_dir: str | Path, *, num_clients: int, threshold: int, min_contributors: int, bits: int
) -> ThresholdParams:
    """Deal ``num_clients`` key shares (any ``threshold`` decrypt) and signing keys into ``key_dir``."""
    if not threshold < min_contributors <= num_clients:
        raise ValueError(
            f"min_contributors must be in [threshold + 1 = {threshold + 1}, num_clients = {num_clients}], got "
            f"{min_contributors}: with m <= t, t - 1 colluding clients could sign zero updates and make a sum of "
            "m hold one honest update"
        )
    key_dir = Path(key_dir)
    public_key, shares = deal_threshold_key(bits, threshold=threshold, num_parties=num_clients)
    key_dir.mkdir(parents=True, exist_ok=True)
    signing = {str(pid): Ed25519PrivateKey.generate() for pid in range(num_clients)}
    write_roster(key_dir, {pid: key.public_key() for pid, key in signing.items()})
    for pid in range(num_clients):
        folder = party_dir(key_dir, pid)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        save_shares(folder, public_key, [shares[pid]])  # its share plus the public files
        write_signing_key(folder, signing[str(pid)])
        write_policy(folder, min_contributors=min_contributors, threshold=threshold, num_parties=num_clients)
    save_shares_public(key_dir, public_key, shares[0].params)
    return shares[0].params


def save_shares_public(key_dir: Path, public_key: PublicKey, params: ThresholdParams) -> None:
    """The public key and the public ``t``-of-``l`` parameters at the top of ``key_dir``."""
    save_keypair(key_dir, public_key)
    (key_dir / PARAMS_FILE).write_text(json.dumps(params.to_dict()))


PARTY_STATE_FILE = "state.json"


def load_party_state(key_dir: str | Path, partition_id: int) -> dict[str, dict[str, Any]]:
    """What client ``partition_id`` remembers on its own disk: rounds it signed, sums it helped decrypt.

    Kept beside its key share (``party-<id>/state.json``), the one copy: unlike
    Flower's ``context.state`` it survives a SuperNode restart, so a restart
    does not let a server ask for a second contribution or a second sum in a
    round already used.
    """
    path = party_dir(key_dir, partition_id) / PARTY_STATE_FILE
    if not path.exists():
        return {"signed": {}, "decrypted": {}}
    raw = json.loads(path.read_text())
    return {"signed": dict(raw.get("signed", {})), "decrypted": dict(raw.get("decrypted", {}))}


def save_party_state(key_dir: str | Path, partition_id: int, state: dict[str, dict[str, Any]]) -> None:
    """Write the party state atomically and durably (temporary file, fsync, rename; mode 0600)."""
    folder = party_dir(key_dir, partition_id)
    partial = folder / f".{PARTY_STATE_FILE}.{os.getpid()}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, folder / PARTY_STATE_FILE)


def load_party(key_dir: str | Path, partition_id: int) -> Party:
    """Client ``partition_id``'s credentials; its policy and roster come from its own folder and ``key_dir``."""
    folder = party_dir(key_dir, partition_id)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no key share for client {partition_id} in {key_dir} (expected {folder}); "
            "deal the keys with: python -m fedapp.keys deal"
        )
    public_key = load_public_key(key_dir)
    params = load_threshold_params(key_dir)
    share = load_share(folder / share_file_name(partition_id + 1), partition_id + 1, public_key=public_key)
    if share.params != params:
        raise ValueError(f"client {partition_id}'s share belongs to another deal ({share.params} vs {params})")
    policy = read_policy(folder, read_roster(key_dir))
    if (policy.threshold, policy.num_parties) != (params.threshold, params.num_parties):
        raise ValueError(f"client {partition_id}'s policy says t/l {policy.threshold}/{policy.num_parties}, "
                         f"the key {params.threshold}/{params.num_parties}")
    return Party(str(partition_id), public_key, share, read_signing_key(folder), policy)
