"""Server momentum outside the secure sum: FedAvgM's rule, on whatever model the inner strategy releases."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg, FedAvgM

from fedapp.server_momentum import ServerMomentum, momentum_step


def result(arrays: list[np.ndarray]) -> tuple[None, FitRes]:
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})


def test_momentum_step_by_hand() -> None:
    # Prepare: x = [1, 2]; the strategy releases [0.5, 2.5] then [0.0, 3.0]
    x = [np.array([1.0, 2.0], dtype=np.float32)]

    # Execute
    first = momentum_step(x, [np.array([0.5, 2.5])], None, server_lr=1.0, momentum=0.5)
    second = momentum_step(first.weights, [np.array([0.0, 3.0])], first.velocity, server_lr=1.0, momentum=0.5)

    # Assert: v1 = g1 = [0.5, -0.5]; x1 = [0.5, 2.5]; g2 = [0.5, -0.5]; v2 = 0.5 v1 + g2 = [0.75, -0.75]
    np.testing.assert_allclose(first.weights[0], [0.5, 2.5])
    np.testing.assert_allclose(second.velocity[0], [0.75, -0.75])
    np.testing.assert_allclose(second.weights[0], [-0.25, 3.25])
    assert second.weights[0].dtype == np.float32


def test_wrapper_around_fedavg_follows_flowers_fedavgm_round_for_round() -> None:
    # Prepare: the same three client results fed to Flower's FedAvgM and to ServerMomentum(FedAvg)
    rng = np.random.default_rng(0)
    x0 = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    rounds = [[result([a + rng.normal(size=a.shape) for a in x0]) for _ in range(3)] for _ in range(3)]
    reference = FedAvgM(initial_parameters=ndarrays_to_parameters(x0), server_learning_rate=0.7, server_momentum=0.9)
    wrapped = ServerMomentum(
        FedAvg(min_fit_clients=0, min_available_clients=0), server_lr=0.7, momentum=0.9
    )
    params = ndarrays_to_parameters(x0)

    # Execute / Assert
    for r, results in enumerate(rounds, start=1):
        expected, _ = reference.aggregate_fit(r, results, [])
        wrapped.configure_fit(r, params, SimpleClientManager())
        params, _ = wrapped.aggregate_fit(r, results, [])
        for got, want in zip(parameters_to_ndarrays(params), parameters_to_ndarrays(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_round_that_releases_nothing_keeps_model_and_velocity() -> None:
    # Prepare: one real round, then one where the inner strategy releases nothing (no results)
    x0 = [np.zeros(2)]
    wrapped = ServerMomentum(FedAvg(min_fit_clients=0, min_available_clients=0), momentum=0.9)
    wrapped.configure_fit(1, ndarrays_to_parameters(x0), SimpleClientManager())
    wrapped.aggregate_fit(1, [result([np.ones(2)])], [])
    velocity = [v.copy() for v in wrapped.velocity]

    # Execute
    params, _ = wrapped.aggregate_fit(2, [], [])

    # Assert
    assert params is None
    np.testing.assert_array_equal(wrapped.velocity[0], velocity[0])


def test_build_strategy_puts_momentum_outside_paillier_around_plain_fedavg(tmp_path) -> None:
    from fedapp.config import ExperimentConfig
    from fedapp.crypto import generate_keypair, save_keypair
    from fedapp.metrics import RunRecorder
    from fedapp.secagg import PaillierSecureAggregation
    from fedapp.strategies import build_strategy

    public, private = generate_keypair(512)
    save_keypair(tmp_path / "keys", public, private)
    cfg = ExperimentConfig.from_dict(
        {"strategy": {"name": "fedavgm", "server_momentum": 0.8},
         "secagg": {"method": "paillier", "key_dir": str(tmp_path / "keys"), "key_bits": 512}}
    )
    strategy = build_strategy(cfg, initial_parameters=[np.zeros(2)], evaluate_fn=None, recorder=RunRecorder(tmp_path))

    chain = []
    while hasattr(strategy, "strategy"):
        chain.append(strategy)
        strategy = strategy.strategy
    momentum = next(s for s in chain if isinstance(s, ServerMomentum))
    assert isinstance(momentum.strategy, PaillierSecureAggregation)
    assert type(strategy) is FedAvg and momentum.momentum == 0.8


def test_impossible_momentum_is_refused() -> None:
    with pytest.raises(ValueError, match="momentum < 1"):
        ServerMomentum(FedAvg(), momentum=1.0)

