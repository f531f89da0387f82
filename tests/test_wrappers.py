"""Update validation: malformed updates are refused with a reason, the rest aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg

from fedapp.metrics import RunRecorder
from fedapp.strategies import _weighted_mean
from fedapp.validation import MalformedUpdateError, UpdateValidation, check_update

SHAPES = [(2, 2), (3,)]
OK = Status(code=Code.OK, message="")


def fedavg(**kwargs: object) -> FedAvg:
    """FedAvg that samples nobody, so configure_fit returns at once without clients."""
    return FedAvg(min_fit_clients=0, min_available_clients=0, fraction_fit=0.0, **kwargs)


class FakeProxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


def fit_res(arrays: list[np.ndarray], n: int = 10, pid: int = 0) -> FitRes:
    return FitRes(status=OK, parameters=ndarrays_to_parameters(arrays), num_examples=n, metrics={"partition_id": pid})


def good(value: float) -> list[np.ndarray]:
    return [np.full(s, value, dtype=np.float32) for s in SHAPES]


@pytest.mark.parametrize(
    ("arrays", "n", "message"),
    [
        ([np.zeros((2, 2))], 10, "expected 2 arrays, got 1"),
        ([np.zeros((2, 3)), np.zeros(3)], 10, r"array 0 has shape \(2, 3\), expected \(2, 2\)"),
        ([np.zeros((2, 2)), np.array([0.0, np.nan, 0.0])], 10, "array 1 contains NaN or Inf"),
        ([np.full((2, 2), np.inf), np.zeros(3)], 10, "array 0 contains NaN or Inf"),
        ([np.zeros((2, 2)), np.zeros(3)], 0, "num_examples must be > 0"),
    ],
)
def test_check_update_names_the_defect(arrays: list[np.ndarray], n: int, message: str) -> None:
    with pytest.raises(MalformedUpdateError, match=message):
        check_update(arrays, SHAPES, n)


def test_malformed_updates_are_dropped_and_the_rest_averaged_by_samples(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path)
    strategy = UpdateValidation(fedavg(), recorder)
    manager = SimpleClientManager()
    strategy.configure_fit(1, ndarrays_to_parameters(good(0.0)), manager)
    nan_update = good(5.0)
    nan_update[1][0] = np.nan
    results = [
        (FakeProxy("a"), fit_res(good(1.0), n=10, pid=0)),
        (FakeProxy("b"), fit_res(good(4.0), n=30, pid=1)),
        (FakeProxy("c"), fit_res(nan_update, n=1000, pid=2)),
        (FakeProxy("d"), fit_res([np.zeros((9, 9)), np.zeros(3)], n=1000, pid=3)),
    ]

    params, _ = strategy.aggregate_fit(1, results, [])

    aggregated = parameters_to_ndarrays(params)
    np.testing.assert_allclose(aggregated[0], np.full((2, 2), (1.0 * 10 + 4.0 * 30) / 40))
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["client"], e["kind"]) for e in events] == [("2", "update_rejected"), ("3", "update_rejected")]
    assert "NaN" in events[0]["reason"] and "shape" in events[1]["reason"]


def test_all_updates_malformed_keeps_the_current_model(tmp_path: Path) -> None:
    strategy = UpdateValidation(fedavg(), RunRecorder(tmp_path))
    strategy.configure_fit(1, ndarrays_to_parameters(good(0.0)), SimpleClientManager())

    params, metrics = strategy.aggregate_fit(1, [(FakeProxy("a"), fit_res([np.zeros(1)]))], [])

    assert params is None and metrics == {}


def test_weighted_mean_of_client_metrics_ignores_ids() -> None:
    merged = _weighted_mean([(10, {"train_loss": 1.0, "partition_id": 0}), (30, {"train_loss": 3.0, "partition_id": 1})])

    assert merged == {"train_loss": pytest.approx(2.5)}


def test_learning_rate_decays_once_per_round() -> None:
    from fedapp.config import ClientConfig
    from fedapp.training import round_lr

    cfg = ClientConfig(lr=4.0, lr_decay=0.5)

    assert [round_lr(cfg, r) for r in (1, 2, 3)] == [4.0, 2.0, 1.0]


def test_privacy_utility_rows_read_epsilon_from_the_client_ledgers(tmp_path: Path) -> None:
    from fedapp.report import privacy_utility_rows, write_report

    run = tmp_path / "eps"
    recorder = RunRecorder(run)
    for rnd, eps in ((1, 0.8), (2, 1.3)):
        for client in ("0", "1"):
            recorder.client(rnd, client, epsilon=eps + (0.1 if client == "1" else 0.0), noise_multiplier=2.5)
        recorder.record(rnd, test_accuracy=0.9 + rnd / 100, test_loss=0.3)
    (run / "experiment.json").write_text(json.dumps({"privacy": {"client": {"enabled": True, "target_epsilon": 1.5, "delta": 1e-5}}}))

    summary = write_report(recorder.table(), run)
    rows = privacy_utility_rows([run])

    assert summary["final_epsilon_max"] == pytest.approx(1.4)
    assert summary["final_epsilon_per_client"] == {"0": pytest.approx(1.3), "1": pytest.approx(1.4)}
    assert rows[0]["epsilon_spent"] == pytest.approx(1.4) and rows[0]["final_test_accuracy"] == pytest.approx(0.92)
    assert (run / "epsilon.png").stat().st_size > 0
