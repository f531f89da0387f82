"""Which client suffers which fault in which round, decided the same way on every node.

A fault plan is a pure function of the experiment: every ClientApp process (a
new one per message in a deployment) recomputes it from ``faults.*`` and its
partition id, so no state has to survive between messages for the faults to
hit the same clients the benchmark expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fedapp.config import ConfigError, FaultsConfig

CLIENT_FAULTS = ("crash", "exit", "hang", "straggler", "drop", "malformed", "replay")
MALFORMATIONS = ("nan", "inf", "shape", "count", "dtype", "norm")
_SCHEDULE_ITEM = re.compile(r"^(kill|restart)\s+(\d+)\s*@\s*(\d+)$")


@dataclass(frozen=True)
class NodeAction:
    """Kill or restart the SuperNode of partition ``partition_id`` when ``round`` starts."""

    action: str
    partition_id: int
    round: int


def _ids(text: str, key: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{key} must be integers separated by commas, e.g. '0,3', got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"{key} must be >= 0, got {text!r}")
    return ids


def node_schedule(faults: FaultsConfig) -> list[NodeAction]:
    """``faults.node_schedule`` parsed, e.g. ``"kill 1 @2, restart 1 @5"``, in round order."""
    actions = []
    for item in filter(None, (part.strip() for part in faults.node_schedule.split(","))):
        match = _SCHEDULE_ITEM.match(item)
        if match is None:
            raise ConfigError(
                f"faults.node_schedule item {item!r} is not 'kill <partition> @<round>' or 'restart <partition> @<round>'"
            )
        actions.append(NodeAction(match[1], int(match[2]), int(match[3])))
    return sorted(actions, key=lambda a: (a.round, a.action != "kill"))


def validate_faults(faults: FaultsConfig, num_clients: int, num_rounds: int) -> None:
    """Raise :class:`ConfigError` naming the key when ``faults`` cannot be carried out."""
    if faults.kind not in ("none", *CLIENT_FAULTS):
        raise ConfigError(f"faults.kind must be one of {['none', *CLIENT_FAULTS]}, got {faults.kind!r}")
    if faults.malformation not in MALFORMATIONS:
        raise ConfigError(f"faults.malformation must be one of {list(MALFORMATIONS)}, got {faults.malformation!r}")
    if not 0.0 <= faults.fraction <= 1.0:
        raise ConfigError(f"faults.fraction must be in [0, 1], got {faults.fraction}")
    ids = _ids(faults.clients, "faults.clients")
    if any(i >= num_clients for i in ids):
        raise ConfigError(f"faults.clients {faults.clients!r} names ids outside [0, {num_clients}) (partition.num_clients)")
    rounds = _ids(faults.rounds, "faults.rounds")
    if any(r < 1 or r > num_rounds for r in rounds):
        raise ConfigError(f"faults.rounds {faults.rounds!r} names rounds outside [1, {num_rounds}] (num_rounds)")
    if faults.kind != "none" and not ids and faults.fraction == 0:
        raise ConfigError(f"faults.kind={faults.kind!r} hits no client: set faults.clients or faults.fraction > 0")
    if faults.slowdown < 1:
        raise ConfigError(f"faults.slowdown must be >= 1 (a factor), got {faults.slowdown}")
    if faults.hang_s <= 0:
        raise ConfigError(f"faults.hang_s must be > 0, got {faults.hang_s}")
    for action in node_schedule(faults):
        if action.partition_id >= num_clients or not 1 <= action.round <= num_rounds:
            raise ConfigError(
                f"faults.node_schedule: {action.action} {action.partition_id} @{action.round} is outside "
                f"partition ids [0, {num_clients}) or rounds [1, {num_rounds}]"
            )


def fault_for(faults: FaultsConfig, partition_id: int, server_round: int) -> str | None:
    """The fault client ``partition_id`` suffers in ``server_round`` (None: behaves).

    With ``faults.clients`` those clients are hit in every round of ``faults.rounds``;
    otherwise each client is hit with probability ``faults.fraction``, drawn
    independently per (seed, round, client), so "30 % crash at random" picks
    different clients every round, identically on every node.
    """
    if faults.kind == "none" or server_round < 1:
        return None
    rounds = _ids(faults.rounds, "faults.rounds")
    if rounds and server_round not in rounds:
        return None
    ids = _ids(faults.clients, "faults.clients")
    if ids:
        return faults.kind if partition_id in ids else None
    draw = np.random.default_rng([faults.seed, server_round, partition_id, 0xFA17]).random()
    return faults.kind if draw < faults.fraction else None
