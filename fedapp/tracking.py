"""TensorBoard scalars for every round of a run (``tracking.tensorboard=true``; extra ``fedapp[tracking]``).

Why TensorBoard beside ``metrics.csv`` and the run store: ``tensorboard --logdir
outputs`` overlays every run under ``outputs/`` (each run writes to its own
``<runtime.output_dir>/tensorboard/``) and follows live runs without any server
of ours. The numbers are the round rows of :class:`fedapp.metrics.RunRecorder`,
nothing new is measured here.

When rows are written: :class:`TrackedProgress` is the run's
:class:`~fedapp.rounds.progress.RoundProgress` with one more audience. At each
round's end (after the central evaluation, the moment the round's one line is
printed) it logs the rows and flushes, so a live run is visible; at close it
logs what arrived after that (federated evaluation, traffic counted late) and
closes the file.

TensorBoard drops a tag's later points when a step goes backwards, so the
tracker never writes a step below the newest one it wrote: a key that reaches
a row one round late is still logged, one that comes later is not. A resumed
run logs its checkpoint's rows again from round 0 into a new file that starts
with a purge of everything the interrupted attempt wrote (``purge_step=0``),
so the rounds it trains again are not shown twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import WARNING
from numbers import Real
from pathlib import Path
from typing import Any

from flwr.common import log

from fedapp.config import ConfigError, TrackingConfig
from fedapp.metrics import RunRecorder
from fedapp.rounds.progress import RoundProgress

TENSORBOARD_DIR = "tensorboard"
MISSING_EXTRA = "tracking.tensorboard needs the optional extra: pip install 'fedapp[tracking]'"

# Row keys with a tag of their own; the rest are grouped by _GROUPS, then "other/".
_TAGS = {
    "fit_clients": "clients/aggregated",
    "fit_failures": "clients/failures",
    "fit_time_s": "time/fit_seconds",
    "round_time_s": "time/round_seconds",
    "delta": "privacy/delta",
    "dp_steps": "privacy/dp_steps",
    "flagged": "robustness/flagged",
    "dropped_updates": "robustness/dropped_updates",
    "quarantined": "robustness/quarantined",
    "malicious_sampled": "robustness/malicious_sampled",
}
# (test on the key, group, prefix to strip), first match wins
_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("test_", "test", "test_"),
    ("train_", "train", "train_"),
    ("federated_", "federated", "federated_"),
    ("fit_", "clients", "fit_"),
    ("epsilon", "privacy", ""),
    ("noise", "privacy", ""),
    ("bytes", "traffic", ""),
    ("detect_", "robustness", ""),
    ("quarantine_", "robustness", ""),
)


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a :class:`ConfigError` naming the extra when it cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module raises it when the `tensorboard` package is missing
        raise ConfigError(MISSING_EXTRA) from None
    return SummaryWriter


def check_tracking(cfg: TrackingConfig) -> None:
    """Refuse, before any round, a run whose tracking cannot work here (one line, a :class:`ConfigError`).

    Not part of :meth:`ExperimentConfig.validate`: clients validate the same
    config and never need TensorBoard.
    """
    if cfg.tensorboard:
        summary_writer_class()


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a round-row key: ``test_accuracy`` -> ``test/accuracy``, ``fit_sampled`` -> ``clients/sampled``.

    Grouped by what they measure, so TensorBoard shows one section per group.
    """
    if key in _TAGS:
        return _TAGS[key]
    for marker, group, prefix in _GROUPS:
        if key.startswith(marker) or (not prefix and marker in key):
            return f"{group}/{key[len(prefix):]}"
    return f"other/{key}"


def scalar_value(value: Any) -> float | None:
    """The value as a float when it is a finite number; None for flags, strings, None, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class TensorBoardTracker:
    """Writes round rows as scalars (step = round), each (round, tag) once, steps never going back."""

    def __init__(self, log_dir: str | Path, *, purge: bool = False) -> None:
        writer_class = summary_writer_class()
        self.log_dir = Path(log_dir)
        self._writer: Any = writer_class(log_dir=str(self.log_dir), purge_step=0 if purge else None)
        self._written: dict[int, set[str]] = {}
        self._last_step = -1

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Log what is new in ``rows`` (by round; rows below the newest logged round are skipped); flush; the count."""
        if self._writer is None:
            return 0
        count = 0
        for row in sorted(rows, key=lambda r: int(r["round"])):
            step = int(row["round"])
            if step < self._last_step:
                continue
            done = self._written.setdefault(step, set())
            for key, raw in row.items():
                value = scalar_value(raw)
                if key == "round" or value is None:
                    continue
                tag = scalar_tag(key)
                if tag in done:
                    continue
                self._writer.add_scalar(tag, value, global_step=step)
                done.add(tag)
                count += 1
            self._last_step = step
        self._writer.flush()
        return count

    def close(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        """Log what is still new in ``rows``, then close the event file (again: nothing happens)."""
        if self._writer is None:
            return
        try:
            self.log_rows(rows)
        finally:
            self._writer.close()
            self._writer = None


class TrackedProgress(RoundProgress):
    """The run's progress reporting, plus TensorBoard: each finished round's rows go to a tracker.

    A subclass, not a change to :class:`RoundProgress`: the round's end is already
    reported there, once per round, after the central evaluation.
    """

    def __init__(
        self, output_dir: str | Path, num_rounds: int, *, recorder: RunRecorder, resume: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(output_dir, num_rounds, resume=resume, **kwargs)
        self.recorder = recorder
        self.tracker: TensorBoardTracker | None = TensorBoardTracker(Path(output_dir) / TENSORBOARD_DIR, purge=resume)

    def end_round(self, server_round: int, line: str, row: dict[str, Any]) -> None:
        super().end_round(server_round, line, row)
        if self.tracker is None:
            return
        try:
            self.tracker.log_rows(self.recorder.table())
        except OSError as err:  # a full disk under the event file must not stop the training
            log(WARNING, "TensorBoard tracking stopped: %s", err)
            self.tracker = None

    def close(self) -> None:
        super().close()
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            try:
                tracker.close(self.recorder.table())
            except OSError as err:
                log(WARNING, "TensorBoard tracking: closing the event file failed: %s", err)
