"""TensorBoard tracking: round rows become scalars TensorBoard reads back; a missing extra is one clear line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from flwr.common import Context, RecordDict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedapp.config import ConfigError, ExperimentConfig, TrackingConfig
from fedapp.hydra_config import compose_experiment
from fedapp.metrics import RunRecorder
from fedapp.rounds.outcomes import RunFailed
from fedapp.tracking import (
    MISSING_EXTRA, TENSORBOARD_DIR, TensorBoardTracker, TrackedProgress, check_tracking, scalar_tag,
)

ROWS = [
    {"round": 0, "test_accuracy": 0.1, "test_loss": 2.3},
    {"round": 1, "test_accuracy": 0.6, "test_loss": 1.2, "train_loss": 1.5, "fit_sampled": 3, "fit_trained": 2,
     "fit_failures": 1, "epsilon_max": 0.5, "round_time_s": 4.25, "upload_round_bytes": 1200,
     "dp_mode": "local", "round_failed": True, "federated_loss": None, "quarantined": float("nan")},
    {"round": 2, "test_accuracy": 0.75, "test_loss": 0.9, "fit_sampled": 3, "epsilon_max": 0.8,
     "central_epsilon": float("inf")},
]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] as TensorBoard loads the folder."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def close(pairs: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return [s for s, _ in pairs] == [s for s, _ in expected] and all(
        math.isclose(v, w, rel_tol=1e-6) for (_, v), (_, w) in zip(pairs, expected)
    )


def test_every_numeric_key_of_every_row_is_a_scalar_at_its_round(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    tracker.log_rows(ROWS[:2])
    live = scalars(tmp_path / "tb")  # flushed after each call: a live run is visible
    tracker.close(ROWS)

    got = scalars(tmp_path / "tb")

    assert close(live["test/accuracy"], [(0, 0.1), (1, 0.6)])
    assert close(got["test/accuracy"], [(0, 0.1), (1, 0.6), (2, 0.75)])
    assert close(got["test/loss"], [(0, 2.3), (1, 1.2), (2, 0.9)])
    assert close(got["train/loss"], [(1, 1.5)])
    assert close(got["clients/sampled"], [(1, 3.0), (2, 3.0)])
    assert close(got["clients/trained"], [(1, 2.0)])
    assert close(got["clients/failures"], [(1, 1.0)])
    assert close(got["privacy/epsilon_max"], [(1, 0.5), (2, 0.8)])
    assert close(got["time/round_seconds"], [(1, 4.25)])
    assert close(got["traffic/upload_round_bytes"], [(1, 1200.0)])
    # strings, flags, None, NaN and inf are not numbers to plot
    assert not {"privacy/central_epsilon", "robustness/quarantined", "federated/loss", "other/dp_mode",
                "other/round_failed"} & set(got)


def test_a_key_that_arrives_a_round_late_is_logged_without_duplicates(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    rows = [{"round": 1, "test_accuracy": 0.5}]
    tracker.log_rows(rows)
    rows[0]["federated_loss"] = 0.7  # federated evaluation ends after the round's line
    rows[0]["test_accuracy"] = 0.99  # already logged: not again
    rows.append({"round": 2, "test_accuracy": 0.6})
    tracker.log_rows(rows)
    tracker.log_rows([{"round": 1, "train_loss": 3.0}, *rows])  # older than the newest step: skipped
    tracker.close(rows)
    tracker.close(rows)  # closing twice is harmless

    got = scalars(tmp_path / "tb")

    assert close(got["test/accuracy"], [(1, 0.5), (2, 0.6)])
    assert close(got["federated/loss"], [(1, 0.7)])
    assert "train/loss" not in got


def test_tags_are_grouped_by_what_they_measure() -> None:
    assert [scalar_tag(k) for k in ("test_accuracy", "train_loss", "fit_sampled", "fit_time_s", "epsilon_max",
                                     "central_epsilon", "central_noise_multiplier", "download_round_bytes",
                                     "detect_precision", "flagged", "something_new")] == [
        "test/accuracy", "train/loss", "clients/sampled", "time/fit_seconds", "privacy/epsilon_max",
        "privacy/central_epsilon", "privacy/central_noise_multiplier", "traffic/download_round_bytes",
        "robustness/detect_precision", "robustness/flagged", "other/something_new",
    ]


def test_the_progress_of_a_run_feeds_each_finished_round(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "run")
    progress = TrackedProgress(tmp_path / "run", 2, recorder=recorder, live=False)
    recorder.record(0, test_accuracy=0.1)
    recorder.record(1, test_accuracy=0.5, fit_sampled=2)
    progress.end_round(1, "Round 1/2", recorder.rows[1])
    after_round_1 = scalars(tmp_path / "run" / TENSORBOARD_DIR)
    recorder.record(2, test_accuracy=0.7, fit_sampled=2)
    progress.end_round(2, "Round 2/2", recorder.rows[2])
    recorder.record(2, federated_accuracy=0.65)
    progress.end_run("completed")

    got = scalars(tmp_path / "run" / TENSORBOARD_DIR)

    assert close(after_round_1["test/accuracy"], [(0, 0.1), (1, 0.5)])
    assert close(got["test/accuracy"], [(0, 0.1), (1, 0.5), (2, 0.7)])
    assert close(got["federated/accuracy"], [(2, 0.65)])


def test_a_resumed_run_replaces_what_the_interrupted_attempt_wrote(tmp_path: Path) -> None:
    first = TensorBoardTracker(tmp_path / "tb")
    first.close([{"round": 0, "test_accuracy": 0.1}, {"round": 1, "test_accuracy": 0.5},
                 {"round": 2, "test_accuracy": 0.55}])  # round 2 was never checkpointed
    resumed = TensorBoardTracker(tmp_path / "tb", purge=True)
    resumed.close([{"round": 0, "test_accuracy": 0.1}, {"round": 1, "test_accuracy": 0.5},
                   {"round": 2, "test_accuracy": 0.6}])

    got = scalars(tmp_path / "tb")

    assert close(got["test/accuracy"], [(0, 0.1), (1, 0.5), (2, 0.6)])


# ---- configuration --------------------------------------------------------------------------------
def test_tracking_is_off_by_default_and_a_config_group() -> None:
    assert ExperimentConfig().tracking == TrackingConfig(tensorboard=False)
    assert compose_experiment(["tracking=tensorboard"]).tracking.tensorboard is True
    assert compose_experiment(["tracking.tensorboard=true"]).tracking.tensorboard is True
    assert ExperimentConfig.from_dict({"tracking": {"tensorboard": True}}).tracking.tensorboard is True


def test_without_the_extra_tensorboard_tracking_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError

    check_tracking(TrackingConfig(tensorboard=False))  # off: nothing to import
    with pytest.raises(ConfigError) as err:
        check_tracking(TrackingConfig(tensorboard=True))

    assert str(err.value) == MISSING_EXTRA
    assert MISSING_EXTRA == "tracking.tensorboard needs the optional extra: pip install 'fedapp[tracking]'"


def test_the_server_app_refuses_the_run_before_any_round(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fedapp.server_app import run_experiment

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = ExperimentConfig.from_dict({
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 200, "synthetic_test_size": 50},
        "partition": {"num_clients": 2}, "runtime": {"output_dir": str(tmp_path / "run")},
        "store": {"enabled": False}, "tracking": {"tensorboard": True},
    })
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

    with pytest.raises(RunFailed, match=r"run config refused: tracking.tensorboard needs the optional extra"):
        run_experiment(None, context, cfg)  # type: ignore[arg-type] - refused before the grid is used

    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_with_tracking_writes_every_round_for_tensorboard(tmp_path: Path) -> None:
    from fedapp.client_app import make_client_app
    from fedapp.server_app import run_experiment
    from tests.inprocess import ThreadGrid

    cfg = ExperimentConfig.from_dict({
        "name": "tracked", "num_rounds": 2,
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 300, "synthetic_test_size": 100},
        "model": {"name": "cnn_mnist_small"}, "partition": {"num_clients": 2},
        "strategy": {"round_timeout_s": 60.0}, "runtime": {"output_dir": str(tmp_path / "run")},
        "tracking": {"tensorboard": True},
    })
    grid = ThreadGrid(cfg, make_client_app(cfg))
    try:
        run_experiment(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}), cfg)
    finally:
        grid.close()

    got = scalars(tmp_path / "run" / TENSORBOARD_DIR)

    assert [step for step, _ in got["test/accuracy"]] == [0, 1, 2]
    assert got["clients/sampled"] == [(1, 2.0), (2, 2.0)]
    assert [step for step, _ in got["time/round_seconds"]] == [1, 2]
    assert [step for step, _ in got["traffic/upload_round_bytes"]] == [1, 2]
