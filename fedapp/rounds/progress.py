"""Live progress of a run: a bar that advances as replies arrive, and a file the launcher follows.

Three audiences, one source:

* a person at a terminal sees a ``rich`` progress bar per round (replies so far,
  accuracy, epsilon) with Flower's log lines scrolling above it;
* a log file (or CI) gets plain lines: one per reply, at most every
  ``min_interval_s`` seconds, and one per round;
* the process launcher, whose ServerApp runs in another process, follows
  ``<output_dir>/progress.jsonl`` (one JSON object per reply / round / wait) and
  prints the same lines as they are written (:class:`ProgressReader`, :func:`progress_line`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER

PROGRESS_FILE = "progress.jsonl"


def round_summary(server_round: int, num_rounds: int, tally_line: str, row: dict[str, Any]) -> str:
    """``Round 3/10: 9 of 10 clients trained: 1 failed: ... | test accuracy 97.10 % | epsilon 1.23 | 12.3 s``."""
    parts = [f"Round {server_round}/{num_rounds}: {tally_line}"]
    if row.get("test_accuracy") is not None:
        parts.append(f"test accuracy {100 * float(row['test_accuracy']):.2f} %")
    if row.get("test_loss") is not None:
        parts.append(f"loss {float(row['test_loss']):.4f}")
    epsilon = row.get("epsilon_max", row.get("central_epsilon", row.get("released_epsilon")))
    if epsilon is not None:
        parts.append(f"epsilon {float(epsilon):.3g}")
    if row.get("round_time_s") is not None:
        parts.append(f"{float(row['round_time_s']):.1f} s")
    return " | ".join(parts)


class RoundProgress:
    """Reports replies and rounds as they happen (terminal bar, log lines, ``progress.jsonl``)."""

    def __init__(
        self, output_dir: str | Path, num_rounds: int, *, live: bool | None = None, resume: bool = False,
        min_interval_s: float = 2.0,
    ) -> None:
        self.path = Path(output_dir) / PROGRESS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.path.unlink(missing_ok=True)
        self.num_rounds = num_rounds
        self.live = sys.stderr.isatty() if live is None else live
        self.min_interval_s = min_interval_s
        self._bar: Any = None
        self._task: Any = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        self._last_line = 0.0
        self._round = 0
        self._expected = 0
        self._replies = 0
        self._accuracy: float | None = None
        self._epsilon: float | None = None

    # ---- events ----------------------------------------------------------------------------
    def start_round(self, server_round: int, expected: int) -> None:
        self._round, self._expected, self._replies = server_round, expected, 0
        self._write({"kind": "start", "round": server_round, "expected": expected})
        if self.live:
            self._ensure_bar()
            self._bar.reset(self._task, total=expected, completed=0, description=self._description())
        else:
            log(INFO, "Round %s/%s: waiting for %d client replies", server_round, self.num_rounds, expected)

    def reply(self, server_round: int, client: str, outcome: str) -> None:
        self._replies += 1
        self._write({"kind": "reply", "round": server_round, "client": client, "outcome": outcome,
                     "replies": self._replies, "expected": self._expected})  # fmt: skip
        if self.live and self._bar is not None:
            self._bar.update(self._task, completed=self._replies, description=self._description())
            return
        now = time.monotonic()
        if now - self._last_line >= self.min_interval_s or self._replies == self._expected:
            self._last_line = now
            log(INFO, "Round %s/%s: %d of %d replies (latest: client %s, %s)", server_round, self.num_rounds,
                self._replies, self._expected, client, outcome)  # fmt: skip

    def waiting(self, server_round: int, line: str) -> None:
        """The server is waiting for nodes; said at least once a minute by the caller."""
        self._write({"kind": "waiting", "round": server_round, "line": line})
        log(WARNING, "%s", line)

    def end_round(self, server_round: int, line: str, row: dict[str, Any]) -> None:
        if row.get("test_accuracy") is not None:
            self._accuracy = float(row["test_accuracy"])
        epsilon = row.get("epsilon_max", row.get("central_epsilon"))
        if epsilon is not None:
            self._epsilon = float(epsilon)
        failed = int(row.get("fit_failures", 0) or 0)
        self._write({"kind": "round", "round": server_round, "line": line, "failures": failed,
                     "test_accuracy": row.get("test_accuracy")})  # fmt: skip
        if self.live and self._bar is not None:
            self._bar.update(self._task, description=self._description())
        log(WARNING if failed else INFO, "%s", line)

    def end_run(self, status: str, line: str = "") -> None:
        self._write({"kind": "end", "status": status, "line": line})
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers = []

    # ---- internals ---------------------------------------------------------------------------
    def _description(self) -> str:
        acc = "" if self._accuracy is None else f" acc {100 * self._accuracy:.1f}%"
        eps = "" if self._epsilon is None else f" eps {self._epsilon:.3g}"
        return f"round {self._round}/{self.num_rounds}{acc}{eps}"

    def _ensure_bar(self) -> None:
        if self._bar is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("replies"),
            TimeElapsedColumn(), redirect_stderr=True, redirect_stdout=True, transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self._description(), total=self._expected)
        # Flower's console handler holds the real stderr; point it at rich's proxy so log lines
        # scroll above the bar instead of tearing it.
        for handler in FLOWER_LOGGER.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                self._handlers.append((handler, handler.stream))
                handler.setStream(sys.stderr)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


class ProgressReader:
    """Reads ``progress.jsonl`` incrementally: each call returns the records written since the last one.

    The process launcher calls it while it waits for ``flwr run``; a line still being
    written (no newline yet) is left for the next call, and a file that does not exist
    yet is simply empty.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self._offset:  # a new run started the file afresh
            self._offset = 0
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete, newline, _ = chunk.rpartition(b"\n")
        if not newline:
            return []
        self._offset += len(complete) + 1
        records = []
        for raw in complete.splitlines():
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return records


def progress_line(record: dict[str, Any]) -> str | None:
    """What the launcher prints for a record: round lines, waits, failures and the run's end; None for the rest."""
    kind = record.get("kind")
    if kind in ("round", "waiting", "end"):
        return str(record.get("line") or f"run {record.get('status')}")
    if kind == "start":
        return f"Round {record.get('round')}: waiting for {record.get('expected')} client replies"
    if kind == "reply" and record.get("outcome") not in ("replied", "trained"):
        return f"Round {record.get('round')}: client {record.get('client')} {record.get('outcome')}"
    return None
