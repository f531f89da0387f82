"""Per-round metrics, per-client records and events, written as the run goes.

Files under the run's output folder (rewritten or appended each round, so an
interrupted run still leaves what it measured):

- ``metrics.json`` / ``metrics.csv``: one row per round (round 0 = initial model);
- ``clients.jsonl``: one line per client per round (what each client reported);
- ``events.jsonl``: decisions with their reason (rejected updates, exclusions, ...);
- ``scores.jsonl``: one line per scored client update per round (anomaly detection).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Callable


class RunRecorder:
    """Collects round rows and client/event lines for one run.

    Every client, score and event line is also kept in :attr:`pending` until
    :meth:`drain` takes it: the run store (:mod:`fedapp.store.durable`) turns a
    round's lines into its database rows and audit entries at the round boundary.
    ``resume=True`` keeps the files of the interrupted attempt (appending to them)
    instead of starting them afresh.
    """

    def __init__(self, output_dir: str | Path, *, resume: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.rows: dict[int, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # called with every event as it is recorded
        self._round_started: dict[int, float] = {}
        if not resume:
            for name in ("clients.jsonl", "events.jsonl", "scores.jsonl"):
                (self.output_dir / name).unlink(missing_ok=True)

    def load_rows(self, rows: list[dict[str, Any]]) -> None:
        """Restore the round rows of a checkpoint (a resumed run continues the same tables)."""
        self.rows = {int(row["round"]): dict(row) for row in rows}
        self._write_tables()

    def drain(self) -> list[dict[str, Any]]:
        """The client, score and event lines recorded since the last call (each with a ``line`` type)."""
        taken, self.pending = self.pending, []
        return taken

    def round_started(self, server_round: int) -> None:
        """Mark the start of a round's training phase (for wall time per round)."""
        self._round_started.setdefault(server_round, time.perf_counter())

    def record(self, server_round: int, /, **metrics: Any) -> None:
        """Merge ``metrics`` into the row of ``server_round`` and rewrite the tables."""
        row = self.rows.setdefault(server_round, {"round": server_round})
        row.update({k: _plain(v) for k, v in metrics.items()})
        started = self._round_started.get(server_round)
        if started is not None:
            row["round_time_s"] = round(time.perf_counter() - started, 3)
        self._write_tables()

    def client(self, server_round: int, client: str, /, **fields: Any) -> None:
        """Append what one client reported in one round.

        Positional-only parameters: a client's metric may be called ``self`` or
        ``server_round`` (it chooses its own keys) without clashing with them.
        """
        self._append("clients.jsonl", {"round": server_round, "client": client, **fields}, line="client")

    def score(self, server_round: int, client: str, /, **fields: Any) -> None:
        """Append how the server scored one client's update in one round."""
        self._append("scores.jsonl", {"round": server_round, "client": client, **fields}, line="score")

    def event(self, kind: str, server_round: int, reason: str, /, **fields: Any) -> None:
        """Append one decision with the reason it was taken (and tell the listeners)."""
        record = {"time": time.time(), "round": server_round, "kind": kind, "reason": reason, **fields}
        self._append("events.jsonl", record, line="event")
        for listener in self.listeners:
            listener(record)

    def table(self) -> list[dict[str, Any]]:
        """Round rows in order."""
        return [self.rows[r] for r in sorted(self.rows)]

    def _append(self, name: str, record: dict[str, Any], *, line: str) -> None:
        plain = {k: _plain(v) for k, v in record.items()}
        self.pending.append({**plain, "line": line})  # last: a client-reported metric named "line" cannot relabel it
        with (self.output_dir / name).open("a") as fh:
            fh.write(json.dumps(plain) + "\n")

    def _write_tables(self) -> None:
        rows = self.table()
        (self.output_dir / "metrics.json").write_text(json.dumps(rows, indent=2))
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        with (self.output_dir / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Lines of a ``*.jsonl`` file written by :class:`RunRecorder` (missing file: empty)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    """JSON-safe scalars (numpy numbers, NaN as None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
