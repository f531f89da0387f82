"""End to end in Flower's simulation engine: training improves and outputs are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp.config import ExperimentConfig
from fedapp.metrics import read_jsonl
from fedapp.simulation import run_in_simulation

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_simulation_accuracy_improves_and_outputs_are_complete(tiny_experiment: ExperimentConfig) -> None:
    out = Path(tiny_experiment.runtime.output_dir)

    summary = run_in_simulation(tiny_experiment)

    rows = json.loads((out / "metrics.json").read_text())
    accuracies = [r["test_accuracy"] for r in rows]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert accuracies[-1] > accuracies[0] + 0.3  # from chance (~0.1) to well above it
    assert summary["final_test_accuracy"] == accuracies[-1]
    clients = read_jsonl(out / "clients.jsonl")
    assert sorted({c["client"] for c in clients}) == ["0", "1", "2"]
    assert all(c["num_examples"] == 360 for c in clients)  # 1,200 / 3 clients, minus 10 % validation
    for name in ("metrics.csv", "rounds.png", "summary.json", "experiment.json"):
        assert (out / name).stat().st_size > 0


@pytest.mark.heavy  # the CIFAR-10 model and data path; the MNIST path runs by default
def test_cifar10_path_runs_end_to_end_on_synthetic_data(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(
        {
            "num_rounds": 1,
            "dataset": {"name": "synthetic-cifar10", "synthetic_train_size": 200, "synthetic_test_size": 100},
            "model": {"name": "cnn_cifar10"},
            "partition": {"num_clients": 2},
            "runtime": {"output_dir": str(tmp_path)},
        }
    )

    summary = run_in_simulation(cfg)

    assert summary["rounds"] == 1
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0


def test_hydra_multirun_sweep_writes_one_run_per_combination(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [
        sys.executable,
        str(ROOT / "simulations" / "run.py"),
        "-m",
        "+experiment=smoke",
        "num_rounds=1",
        "dataset.synthetic_train_size=300",
        "partition.num_clients=2",
        "partition=iid,shards",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["rounds"] for s in summaries] == [1, 1]
    partitions = [json.loads((tmp_path / str(i) / "experiment.json").read_text())["partition"]["name"] for i in (0, 1)]
    assert partitions == ["iid", "shards"]
    assert "summary" in done.stdout


def test_runner_reports_a_config_mistake_without_a_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "partition.alpha=-1", f"hydra.run.dir={tmp_path}"]

    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert "partition.alpha must be > 0" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_central_evaluation_runs_every_eval_every_rounds_and_after_the_last() -> None:
    # Prepare: 7 rounds, evaluate every 3 -> rounds 3, 6 and the last, 7
    from fedapp.components import new_model
    from fedapp.config import ExperimentConfig
    from fedapp.server_app import centralized_evaluator
    from fedapp.training import get_weights

    cfg = ExperimentConfig.from_dict(
        {"num_rounds": 7, "runtime": {"eval_every": 3}, "model": {"name": "cnn_mnist_small"},
         "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 100, "synthetic_test_size": 50}}
    )
    evaluate_fn = centralized_evaluator(cfg)
    weights = get_weights(new_model(cfg))

    # Execute
    evaluated = [r for r in range(1, 8) if evaluate_fn(r, weights, {}) is not None]

    # Assert
    assert evaluated == [3, 6, 7]
