"""Durable record of runs: a database of runs, rounds, client updates, checkpoints and events."""

from fedapp.store.db import RunStore, StoreError, UnknownRunError, effective_rounds
from fedapp.store.records import (
    RUN_STATUSES,
    UPDATE_STATUSES,
    CheckpointRecord,
    ClientUpdateRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    code_version,
    config_hash,
)

__all__ = [
    "RUN_STATUSES",
    "UPDATE_STATUSES",
    "CheckpointRecord",
    "ClientUpdateRecord",
    "EventRecord",
    "RoundRecord",
    "RunRecord",
    "RunStore",
    "StoreError",
    "UnknownRunError",
    "code_version",
    "config_hash",
    "effective_rounds",
]
