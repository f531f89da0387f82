"""DP-SGD end to end in Flower's simulation engine: cumulative epsilon, budget, exclusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dp_accounting import dp_event, rdp

from fedapp.config import ExperimentConfig
from fedapp.metrics import read_jsonl
from fedapp.privacy import PrivacyLedger, plan_client_dp
from fedapp.simulation import run_in_simulation

pytestmark = pytest.mark.slow
DELTA = 1e-4


def dp_experiment(tmp_path: Path, num_rounds: int, client_dp: dict) -> ExperimentConfig:
    """Three clients of 360 synthetic samples (q = 1/12, 12 steps per round)."""
    return ExperimentConfig.from_dict(
        {
            "name": "dp",
            "num_rounds": num_rounds,
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 1200, "synthetic_test_size": 200},
            "partition": {"num_clients": 3},
            "model": {"name": "cnn_mnist_small"},
            "client": {"batch_size": 30, "lr": 0.5, "momentum": 0.0},
            "strategy": {"min_fit_clients": 2, "min_available_clients": 3},
            "runtime": {"output_dir": str(tmp_path / "run")},
            "privacy": {
                "client": {"enabled": True, "delta": DELTA, "ledger_dir": str(tmp_path / "ledgers"), **client_dp}
            },
        }
    )


def google_rdp_epsilon(sigma: float, q: float, steps: int) -> float:
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def test_reported_epsilon_grows_per_client_and_equals_the_ledger(tmp_path: Path) -> None:
    # Prepare: a whole-run target of epsilon 4 over 2 rounds
    cfg = dp_experiment(tmp_path, num_rounds=2, client_dp={"target_epsilon": 4.0})
    plan = plan_client_dp(cfg.privacy.client, num_samples=360, batch_size=30, local_epochs=1, num_rounds=2)

    # Execute
    run_in_simulation(cfg)

    # Assert
    out = Path(cfg.runtime.output_dir)
    reports = read_jsonl(out / "clients.jsonl")
    for client in ("0", "1", "2"):
        mine = sorted((r["round"], r["epsilon"]) for r in reports if r["client"] == client)
        assert [rnd for rnd, _ in mine] == [1, 2]
        assert mine[0][1] < mine[1][1] <= 4.0
        ledger = PrivacyLedger.load(tmp_path / "ledgers" / f"partition-{client}.json")
        assert ledger.steps == 2 * plan.steps_per_round == 24
        assert mine[1][1] == pytest.approx(ledger.epsilon(DELTA), rel=1e-9)
        assert mine[1][1] == pytest.approx(google_rdp_epsilon(plan.noise_multiplier, 1 / 12, 24), rel=0.01)
    rows = {r["round"]: r for r in json.loads((out / "metrics.json").read_text())}
    assert rows[2]["epsilon_max"] == pytest.approx(max(r["epsilon"] for r in reports if r["round"] == 2))


def test_clients_over_budget_decline_are_excluded_and_training_ends(tmp_path: Path) -> None:
    # Prepare: sigma 1.0 and a budget between two and three rounds' epsilon; 4 rounds planned
    budget = (google_rdp_epsilon(1.0, 1 / 12, 24) + google_rdp_epsilon(1.0, 1 / 12, 36)) / 2
    cfg = dp_experiment(tmp_path, num_rounds=4, client_dp={"noise_multiplier": 1.0, "epsilon_budget": budget})

    # Execute
    run_in_simulation(cfg)

    # Assert: rounds 1-2 train, round 3 everyone declines, round 4 does not train
    out = Path(cfg.runtime.output_dir)
    events = read_jsonl(out / "events.jsonl")
    excluded = [e for e in events if e["kind"] == "client_excluded"]
    assert sorted(e["client"] for e in excluded) == ["0", "1", "2"]
    assert {e["round"] for e in excluded} == {3}
    assert [e["round"] for e in events if e["kind"] == "training_ended"] == [4]
    trained = [r for r in read_jsonl(out / "clients.jsonl") if not r.get("declined")]
    assert {r["round"] for r in trained} == {1, 2}
    for client in ("0", "1", "2"):
        assert PrivacyLedger.load(tmp_path / "ledgers" / f"partition-{client}.json").epsilon(DELTA) <= budget


def test_client_and_central_dp_combined_record_both_epsilons(tmp_path: Path) -> None:
    # Prepare: 2 of 3 clients per round (q = 2/3), central sigma 1.0, client sigma 1.0
    cfg = dp_experiment(tmp_path, num_rounds=2, client_dp={"noise_multiplier": 1.0})
    cfg.strategy.fraction_fit = 0.67
    cfg.privacy.central.enabled = True
    cfg.privacy.central.delta = DELTA
    cfg.validate()

    # Execute
    run_in_simulation(cfg)

    # Assert: 2 of 3 sampled twice means some client trained in both rounds, so the
    # round-2 maximum is two rounds' client epsilon
    rows = {r["round"]: r for r in json.loads((Path(cfg.runtime.output_dir) / "metrics.json").read_text())}
    for rnd in (1, 2):
        assert rows[rnd]["fit_clients"] == 2
        assert rows[rnd]["central_epsilon"] == pytest.approx(google_rdp_epsilon(1.0, 2 / 3, rnd), rel=0.01)
        assert rows[rnd]["epsilon_max"] == pytest.approx(google_rdp_epsilon(1.0, 1 / 12, 12 * rnd), rel=0.01)
    assert rows[1]["central_epsilon"] < rows[2]["central_epsilon"]
