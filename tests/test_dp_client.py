"""The DP-SGD client: ledger kept across client objects and processes, declines over budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.common import RecordDict

from fedapp.client_app import LEDGER_STATE_KEY, FedappClient
from fedapp.components import new_model
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.training import get_weights

SIGMA, DELTA = 1.1, 1e-4


def dp_experiment(tmp_path: Path, **client_dp: object) -> ExperimentConfig:
    """Two clients of 270 training samples each: q = 1/9, 9 DP-SGD steps per round."""
    return ExperimentConfig.from_dict(
        {
            "num_rounds": 3,
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 600, "synthetic_test_size": 100},
            "partition": {"num_clients": 2},
            "model": {"name": "cnn_mnist_small"},
            "client": {"batch_size": 32, "lr": 0.1, "momentum": 0.0},
            "runtime": {"output_dir": str(tmp_path / "run")},
            "privacy": {"client": {"enabled": True, "noise_multiplier": SIGMA, "delta": DELTA, **client_dp}},
        }
    )


def google_rdp_epsilon(steps: int, q: float = 1 / 9) -> float:
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(SIGMA)), steps)
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def test_epsilon_accumulates_across_new_client_objects_via_context_state(tmp_path: Path) -> None:
    # Prepare: one node state, a new client object each round (as Flower does)
    cfg = dp_experiment(tmp_path)
    state = RecordDict()
    weights = get_weights(new_model(cfg))

    # Execute
    _, n1, m1 = FedappClient(cfg, 0, state).fit(weights, {"server_round": 1})
    _, n2, m2 = FedappClient(cfg, 0, state).fit(weights, {"server_round": 2})

    # Assert
    assert n1 == n2 == 270
    assert (m1["dp_steps"], m2["dp_steps"]) == (9, 18)
    assert m1["epsilon"] == pytest.approx(google_rdp_epsilon(9), rel=0.01)
    assert m2["epsilon"] == pytest.approx(google_rdp_epsilon(18), rel=0.01)
    assert list(state[LEDGER_STATE_KEY]["steps"]) == [18]


def test_ledger_survives_a_lost_node_state_through_the_ledger_dir(tmp_path: Path) -> None:
    # Prepare: round 1 on one node state; the node restarts (empty state), same ledger_dir
    cfg = dp_experiment(tmp_path, ledger_dir=str(tmp_path / "ledgers"))
    weights = get_weights(new_model(cfg))
    FedappClient(cfg, 1, RecordDict()).fit(weights, {"server_round": 1})

    # Execute
    _, _, metrics = FedappClient(cfg, 1, RecordDict()).fit(weights, {"server_round": 2})

    # Assert
    assert (tmp_path / "ledgers" / "partition-1.json").exists()
    assert metrics["dp_steps"] == 18
    assert metrics["epsilon"] == pytest.approx(google_rdp_epsilon(18), rel=0.01)


def test_client_whose_next_round_exceeds_the_budget_declines_explicitly(tmp_path: Path) -> None:
    # Prepare: budget between one round's and two rounds' epsilon
    budget = (google_rdp_epsilon(9) + google_rdp_epsilon(18)) / 2
    cfg = dp_experiment(tmp_path, epsilon_budget=budget)
    state = RecordDict()
    weights = get_weights(new_model(cfg))
    FedappClient(cfg, 0, state).fit(weights, {"server_round": 1})

    # Execute
    returned, num_examples, metrics = FedappClient(cfg, 0, state).fit(weights, {"server_round": 2})

    # Assert: unchanged parameters, a reason, and no budget spent
    assert all(np.array_equal(a, b) for a, b in zip(returned, weights))
    assert num_examples == 0
    assert metrics["declined"] == 1
    assert metrics["reason_code"] == "privacy_budget"
    assert "over the budget" in str(metrics["reason"])
    assert metrics["epsilon"] == pytest.approx(google_rdp_epsilon(9), rel=0.01)
    assert list(state[LEDGER_STATE_KEY]["steps"]) == [9]


def test_ledger_kept_with_another_accountant_is_refused(tmp_path: Path) -> None:
    # Prepare: an RDP ledger on disk, then the experiment switches to PRV
    ledgers = str(tmp_path / "ledgers")
    weights = get_weights(new_model(dp_experiment(tmp_path)))
    FedappClient(dp_experiment(tmp_path, ledger_dir=ledgers), 0, RecordDict()).fit(weights, {"server_round": 1})
    prv = dp_experiment(tmp_path, ledger_dir=ledgers, accountant="prv")

    # Execute / Assert
    with pytest.raises(ConfigError, match="'rdp' accountant"):
        FedappClient(prv, 0, RecordDict()).fit(weights, {"server_round": 2})
