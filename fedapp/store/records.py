"""What the run store holds, as plain dataclasses.

The store's API speaks only these records, so the code that trains never sees a
database row, and the database layer can change (SQLite for one machine,
PostgreSQL for a team) without touching it. Times are seconds since the epoch
(``time.time()``): one float compares and subtracts the same on every backend.

A run is retried in *attempts*: each resume increments :attr:`RunRecord.attempt`,
and the rounds, client updates and checkpoints it writes carry that number, so a
round that was run twice keeps both versions and readers can tell which one the
final model descends from (:meth:`fedapp.store.db.RunStore.rounds`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_STATUSES = ("running", "completed", "failed", "interrupted")
UPDATE_STATUSES = ("accepted", "refused", "declined", "quarantined")
ACTION_STATUSES = ("pending", "applied", "refused")
ROLES = ("viewer", "operator")


def _check_status(status: str, allowed: tuple[str, ...], what: str) -> None:
    if status not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {status!r}")


@dataclass
class RunRecord:
    """One training run: what was asked (config), by which code, and how far it got."""

    run_id: str
    name: str
    config: dict[str, Any]
    config_hash: str
    code_version: str
    status: str
    started_at: float
    output_dir: str
    ended_at: float | None = None
    error: str | None = None
    last_round: int = 0
    attempt: int = 1
    audit_head: str = ""
    audit_seq: int = 0

    def __post_init__(self) -> None:
        _check_status(self.status, RUN_STATUSES, "RunRecord.status")


@dataclass
class RoundRecord:
    """One round of one attempt: the server's metrics and who took part."""

    run_id: str
    round: int
    attempt: int
    metrics: dict[str, Any]
    started_at: float
    ended_at: float
    participants: list[str]
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


@dataclass
class ClientUpdateRecord:
    """What the server decided about one client's update in one round, and why."""

    run_id: str
    round: int
    attempt: int
    client: str
    status: str
    reason: str = ""
    num_examples: int | None = None
    update_norm: float | None = None
    anomaly_score: float | None = None
    epsilon: float | None = None
    reputation: float | None = None

    def __post_init__(self) -> None:
        _check_status(self.status, UPDATE_STATUSES, "ClientUpdateRecord.status")


@dataclass
class CheckpointRecord:
    """A checkpoint file, with the hash that is checked before it is loaded.

    ``audit_head``/``audit_seq`` pin the audit chain as it was when the file was
    written, so a resume can verify that the log it continues is the one the
    checkpoint saw. The store files it under the attempt of the round it is
    committed with (a round can be checkpointed again by a later attempt).
    """

    run_id: str
    round: int
    path: str
    sha256: str
    size_bytes: int
    write_s: float
    audit_head: str
    audit_seq: int
    created_at: float


@dataclass
class EventRecord:
    """A decision taken during a round (an exclusion, a refused update, ...) and its reason."""

    run_id: str
    round: int
    kind: str
    reason: str
    fields: dict[str, Any]
    time: float


@dataclass
class ActionRecord:
    """An operator's request to a running run, and what the ServerApp made of it.

    The API writes it ``pending`` (or ``refused`` at once, with the reason, when the
    run's configuration cannot honour it: an attempt is on record either way); the
    ServerApp applies or refuses it at the next round boundary and fills in the outcome: ``boundary_round`` is the round
    after which it was applied, ``effective_round`` the first round that runs
    under it (None for a stop, after which no round runs).
    """

    run_id: str
    action: str
    params: dict[str, Any]
    requested_by: str
    requested_at: float
    reason: str = ""
    token_id: str = ""  # which token asked (its id, never the token): a revoked token's requests can be found
    status: str = "pending"
    boundary_round: int | None = None
    effective_round: int | None = None
    applied_at: float | None = None
    result: str = ""
    id: int | None = None

    def __post_init__(self) -> None:
        _check_status(self.status, ACTION_STATUSES, "ActionRecord.status")


@dataclass
class TokenRecord:
    """Who an API token was issued to, with which role, until when; never the token itself."""

    token_id: str
    subject: str
    role: str
    issued_at: float
    expires_at: float
    revoked_at: float | None = None

    def __post_init__(self) -> None:
        _check_status(self.role, ROLES, "TokenRecord.role")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON: equal configs hash equal whatever their key order.

    A resume compares it with the stored run's hash, so it must not depend on how
    the dict was built.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def code_version() -> str:
    """Which code ran: ``git describe --always --dirty`` of fedapp's checkout, else its version.

    Git is asked only when the package sits in a checkout (``.git`` beside it):
    an installed copy inside some other repository must not report that
    repository's commit. Never raises: a run is not refused for want of git.
    """
    package = Path(__file__).resolve().parents[1]
    if (package.parent / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=package.parent,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from importlib.metadata import version

        return version("fedapp")
    except Exception:  # noqa: BLE001 - any failure falls back to the module's constant
        from fedapp import __version__

        return __version__
