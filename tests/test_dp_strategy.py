"""Central (user-level) DP: Flower's clipping + noise around FedAvg, accounted per round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg

from fedapp.config import ExperimentConfig
from fedapp.dp_strategy import CentralDPAccounting, ClientEpsilonRecording
from fedapp.metrics import RunRecorder
from fedapp.strategies import build_strategy

OK = Status(code=Code.OK, message="")


class FakeProxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


def manager() -> SimpleClientManager:
    """Two connected clients (FedAvg's configure_fit waits for min_fit_clients = 2)."""
    clients = SimpleClientManager()
    for cid in ("a", "b"):
        clients.register(FakeProxy(cid))  # type: ignore[arg-type]
    return clients


def res(values: list[float], n: int, metrics: dict | None = None) -> FitRes:
    return FitRes(OK, ndarrays_to_parameters([np.array(values, dtype=np.float64)]), n, metrics or {})


def central(recorder: RunRecorder, sigma: float, m: int = 2, n: int = 4) -> CentralDPAccounting:
    base = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    return CentralDPAccounting(
        base, noise_multiplier=sigma, clipping_norm=1.0, num_sampled_clients=m, num_clients=n, delta=1e-5, recorder=recorder
    )


def test_updates_are_clipped_and_averaged_uniformly(tmp_path: Path) -> None:
    # Prepare: global model 0; updates (3, 4) (norm 5) and (0, 1), C = 1, almost no noise
    strategy = central(RunRecorder(tmp_path), sigma=1e-9)
    strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), manager())
    results = [(FakeProxy("a"), res([3.0, 4.0], n=10)), (FakeProxy("b"), res([0.0, 1.0], n=1000))]

    # Execute
    aggregated, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]

    # Assert: mean of (0.6, 0.8) and (0, 1) = (0.3, 0.9), despite 10 vs 1000 examples
    np.testing.assert_allclose(parameters_to_ndarrays(aggregated)[0], [0.3, 0.9], atol=1e-6)


def test_user_level_epsilon_per_round_matches_google_rdp(tmp_path: Path) -> None:
    # Prepare: sigma 1.2, m = 2 of n = 4 clients (q = 0.5), three rounds
    recorder = RunRecorder(tmp_path)
    strategy = central(recorder, sigma=1.2)
    results = [(FakeProxy("a"), res([0.1, 0.0], n=5)), (FakeProxy("b"), res([0.0, 0.1], n=5))]

    # Execute
    for rnd in (1, 2, 3):
        strategy.configure_fit(rnd, ndarrays_to_parameters([np.zeros(2)]), manager())
        strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]

    # Assert
    for rnd in (1, 2, 3):
        event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.2)), rnd)
        acc = rdp.RdpAccountant()
        acc.compose(event)
        assert recorder.rows[rnd]["central_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
    assert recorder.rows[1]["central_epsilon"] < recorder.rows[2]["central_epsilon"] < recorder.rows[3]["central_epsilon"]


def test_fewer_results_than_sampled_are_accounted_with_less_effective_noise(tmp_path: Path) -> None:
    # Prepare: m = 2 planned, only 1 update arrives: noise sigma*C/2 on a mean of 1 -> sigma/2
    recorder = RunRecorder(tmp_path)
    strategy = central(recorder, sigma=2.0)
    strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), manager())

    # Execute
    strategy.aggregate_fit(1, [(FakeProxy("a"), res([0.1, 0.0], n=5))], [])  # type: ignore[arg-type]

    # Assert
    assert recorder.rows[1]["central_noise_multiplier"] == 1.0


def test_client_epsilon_max_and_mean_go_into_the_round_row(tmp_path: Path) -> None:
    # Prepare
    recorder = RunRecorder(tmp_path)
    strategy = ClientEpsilonRecording(FedAvg(), recorder)
    results = [(FakeProxy("a"), res([0.0, 0.0], 5, {"epsilon": 1.0})), (FakeProxy("b"), res([0.0, 0.0], 5, {"epsilon": 2.0}))]

    # Execute
    strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]

    # Assert
    assert recorder.rows[1]["epsilon_max"] == 2.0
    assert recorder.rows[1]["epsilon_mean"] == 1.5


def test_build_strategy_stacks_exclusion_outside_validation_and_central_dp_inside(tmp_path: Path) -> None:
    # Prepare
    cfg = ExperimentConfig.from_dict(
        {
            "partition": {"num_clients": 4},
            "privacy": {"client": {"enabled": True, "noise_multiplier": 1.0}, "central": {"enabled": True}},
        }
    )

    # Execute
    strategy = build_strategy(cfg, initial_parameters=[np.zeros(2)], evaluate_fn=None, recorder=RunRecorder(tmp_path))

    # Assert
    chain = []
    while hasattr(strategy, "strategy"):
        chain.append(type(strategy).__name__)
        strategy = strategy.strategy
    assert chain == [
        "MetricsRecording",
        "ClientExclusion",
        "ClientEpsilonRecording",
        "UpdateValidation",
        "CentralDPAccounting",
        "DifferentialPrivacyServerSideFixedClipping",
    ]
    assert type(strategy).__name__ == "FedAvg"
