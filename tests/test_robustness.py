"""Anomaly detection, reputation and quarantine; composition of robust rules with the other wrappers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg, FedTrimmedAvg, Krum

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.dp_strategy import ClientEpsilonRecording
from fedapp.exclusion import ClientExclusion, ExclusionList
from fedapp.metrics import RunRecorder, read_jsonl
from fedapp.robustness import (
    AnomalyQuarantine,
    cosine_to_median,
    krum_scores,
    precision_recall,
    robust_z,
    score_updates,
)
from fedapp.strategies import build_strategy, check_strategy_config

OK = Status(code=Code.OK, message="")
START = [np.zeros(4, dtype=np.float32)]
# Four honest updates near [1, 1, 1, 1] and three attackers (hand-built):
HONEST = [[1.0, 1.1, 0.9, 1.0], [0.9, 1.0, 1.1, 1.0], [1.1, 0.9, 1.0, 1.0], [1.0, 1.0, 1.0, 1.1]]
SIGN_FLIP = [-1.0, -1.1, -0.9, -1.0]  # client 4: client 0's update negated
SCALED = [10.0, 11.0, 9.0, 10.0]  # client 5: client 0's update boosted 10x
GAUSSIAN = [3.1, -4.2, 5.3, -2.4]  # client 6: a fixed draw standing in for N(0, 4^2) noise
ROUND_OF_SEVEN = HONEST + [SIGN_FLIP, SCALED, GAUSSIAN]


class FakeProxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


def manager_with(cids: list[str]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for cid in cids:
        manager.register(FakeProxy(cid))  # type: ignore[arg-type]
    return manager


def results_for(pids: list[int], updates: dict[int, list[float]]) -> list:
    return [
        (FakeProxy(f"n{pid}"), FitRes(OK, ndarrays_to_parameters([np.array(updates[pid], np.float32)]), 10, {"partition_id": pid}))
        for pid in pids
    ]


# ---------------------------------------------------------------- the scores, by hand


def test_robust_z_ignores_the_outlier_in_its_scale() -> None:
    # median 3, MAD = median(2, 1, 0, 1, 97) = 1, scale 1.4826: z(100) = 97 / 1.4826 = 65.43
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), floor=0.0)

    np.testing.assert_allclose(z, [-1.349, -0.6745, 0.0, 0.6745, 65.426], atol=1e-3)


def test_robust_z_uses_the_floor_when_the_spread_is_zero() -> None:
    z = robust_z(np.array([2.0, 2.0, 2.0, 5.0]), floor=0.5)

    np.testing.assert_allclose(z, [0.0, 0.0, 0.0, 6.0])


def test_cosine_to_median_and_krum_scores_by_hand() -> None:
    # Prepare: 2-D updates; coordinate-wise median of (1,0), (2,0), (0,1) is (1, 0)
    updates = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])

    # Execute
    cosines = cosine_to_median(updates)
    krum = krum_scores(np.array([[0.0], [2.0], [3.0], [7.0], [30.0]]), num_malicious=1)

    # Assert: cos to (1, 0) = 1, 1, 0; Krum: 2 nearest squared distances (see test_attacks)
    np.testing.assert_allclose(cosines, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(krum, [13.0, 5.0, 10.0, 41.0, 1258.0])


def test_detector_flags_signflip_scaling_and_gaussian_with_precision_and_recall_one() -> None:
    # Execute
    scores = score_updates(np.array(ROUND_OF_SEVEN), num_malicious=3, threshold=3.0)

    # Assert: the median norm is sqrt(4.02) = 2.005 (three honest updates and the flipped one have
    # it), the MAD is 0, so the scale is the floor 0.15 * 2.005: the scaled update's norm z is
    # (sqrt(402) - 2.005) / 0.3007 = 60; the flipped one has cosine -1 to the median (~[1, 1, 1, 1]);
    # the noise has norm 7.9 and points away from it.
    flagged = {i for i, s in enumerate(scores) if s.flagged}
    assert flagged == {4, 5, 6}
    assert precision_recall([str(i) for i in flagged], ["4", "5", "6"]) == (1.0, 1.0)
    assert scores[4].cosine == pytest.approx(-1.0, abs=0.02) and "cosine" in scores[4].reason
    assert scores[5].z_norm == pytest.approx((402**0.5 - 4.02**0.5) / (0.15 * 4.02**0.5))
    assert "norm" in scores[5].reason
    assert all(s.anomaly < 1.0 for s in scores[:4])


# ---------------------------------------------------------------- the wrapper: flag, drop, quarantine, release


def quarantining(tmp_path: Path, *, min_fit: int = 2, release_after: int = 0, truth: set[str] = frozenset({"4", "5", "6"})):
    recorder = RunRecorder(tmp_path)
    excluded = ExclusionList()
    base = FedAvg(min_fit_clients=min_fit, min_available_clients=min_fit, initial_parameters=ndarrays_to_parameters(START))
    inner = AnomalyQuarantine(
        base, min_fit_clients=min_fit, num_malicious=3, release_after=release_after, excluded=excluded,
        recorder=recorder, ground_truth=truth,
    )
    outer = ClientExclusion(inner, min_fit_clients=min_fit, recorder=recorder, excluded=excluded)
    return outer, inner, recorder


def play_round(strategy, manager, server_round: int, updates: dict[int, list[float]]):
    instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(START), manager)
    sampled = sorted(int(proxy.cid[1:]) for proxy, _ in instructions)
    aggregated, _ = strategy.aggregate_fit(server_round, results_for(sampled, updates), [])
    return sampled, parameters_to_ndarrays(aggregated)[0]


def test_flagged_updates_are_dropped_and_twice_flagged_clients_are_not_sampled_again(tmp_path: Path) -> None:
    # Prepare: seven nodes n0..n6; clients 4, 5, 6 attack every round
    strategy, inner, recorder = quarantining(tmp_path)
    manager = manager_with([f"n{i}" for i in range(7)])
    updates = dict(enumerate(ROUND_OF_SEVEN))

    # Execute
    sampled1, model1 = play_round(strategy, manager, 1, updates)
    sampled2, _ = play_round(strategy, manager, 2, updates)
    sampled3, _ = play_round(strategy, manager, 3, updates)

    # Assert: round 1 averages the four honest updates only: [1.0, 1.0, 1.0, 1.025]
    np.testing.assert_allclose(model1, [1.0, 1.0, 1.0, 1.025], rtol=1e-6)
    # reputation 1 -> 0.5 (round 1) -> 0.25 < 0.4 (round 2): quarantined, not sampled in round 3
    assert sampled1 == sampled2 == list(range(7))
    assert sampled3 == [0, 1, 2, 3]
    assert inner.reputation["4"] == 0.25 and inner.reputation["0"] == 1.0
    events = read_jsonl(tmp_path / "events.jsonl")
    assert sorted(e["client"] for e in events if e["kind"] == "client_quarantined") == ["4", "5", "6"]
    assert {e["client"] for e in events if e["kind"] == "client_flagged"} == {"4", "5", "6"}
    assert all("reputation 0.250 < 0.4" in e["reason"] for e in events if e["kind"] == "client_quarantined")
    rows = recorder.rows
    assert (rows[1]["detect_precision"], rows[1]["detect_recall"], rows[1]["dropped_updates"]) == (1.0, 1.0, 3)
    assert (rows[1]["quarantine_recall"], rows[2]["quarantine_precision"], rows[2]["quarantine_recall"]) == (0.0, 1.0, 1.0)
    assert rows[3]["malicious_sampled"] == 0 and rows[3]["flagged"] == 0 and rows[3]["detect_recall"] is None
    lines = read_jsonl(tmp_path / "scores.jsonl")
    assert len(lines) == 7 + 7 + 4 and {"norm", "cosine", "krum", "anomaly", "reputation"} <= set(lines[0])


def test_quarantined_client_is_released_after_k_rounds_on_probation(tmp_path: Path) -> None:
    # Prepare: release_after = 1; client 5 attacks in rounds 1-2, then behaves
    strategy, inner, _ = quarantining(tmp_path, release_after=1, truth={"5"})
    manager = manager_with([f"n{i}" for i in range(6)])
    attacking = dict(enumerate(HONEST + [[1.0, 1.0, 1.0, 1.0], SCALED]))
    behaving = dict(attacking) | {5: [1.0, 0.9, 1.0, 1.1]}

    # Execute
    play_round(strategy, manager, 1, attacking)
    play_round(strategy, manager, 2, attacking)  # quarantined at the end of round 2
    sampled3, _ = play_round(strategy, manager, 3, behaving)  # sits out round 3
    sampled4, _ = play_round(strategy, manager, 4, behaving)  # released: 4 - 2 > 1

    # Assert: back on probation at reputation 0.4, one clean round lifts it to 0.7
    assert 5 not in sampled3 and 5 in sampled4
    assert inner.reputation["5"] == pytest.approx(0.7)
    kinds = [(e["kind"], e["round"]) for e in read_jsonl(tmp_path / "events.jsonl") if e.get("client") == "5"]
    assert ("client_quarantined", 2) in kinds and ("client_released", 4) in kinds


def test_quarantine_never_leaves_fewer_than_min_fit_clients(tmp_path: Path) -> None:
    # Prepare: five nodes, min_fit_clients = 4, clients 3 and 4 both scale their update
    strategy, _, _ = quarantining(tmp_path, min_fit=4, truth={"3", "4"})
    manager = manager_with([f"n{i}" for i in range(5)])
    updates = {0: HONEST[0], 1: HONEST[1], 2: HONEST[2], 3: SCALED, 4: [11.0, 9.0, 10.0, 10.0]}

    # Execute
    for server_round in (1, 2):
        play_round(strategy, manager, server_round, updates)
    sampled3, _ = play_round(strategy, manager, 3, updates)

    # Assert: one of them is quarantined, the other deferred with the reason; training goes on
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["kind"] for e in events if e["kind"] == "client_quarantined"] == ["client_quarantined"]
    deferred = [e for e in events if e["kind"] == "quarantine_deferred"]
    assert deferred and "fewer than strategy.min_fit_clients=4" in deferred[0]["reason"]
    assert len(sampled3) == 4
    assert not [e for e in events if e["kind"] == "training_ended"]


# ---------------------------------------------------------------- composition with the rest of fedapp


def robust_cfg(tmp_path: Path, **sections: dict) -> ExperimentConfig:
    raw = {
        "partition": {"num_clients": 10},
        "strategy": {"name": "krum", "num_malicious": 2},
        "attack": {"name": "scaling", "fraction": 0.2},
        "defense": {"name": "detect"},
        "runtime": {"output_dir": str(tmp_path)},
    }
    for key, value in sections.items():
        raw[key] = raw.get(key, {}) | value
    return ExperimentConfig.from_dict(raw)


def chain(strategy) -> list[object]:  # noqa: ANN001
    out = [strategy]
    while hasattr(out[-1], "strategy"):
        out.append(out[-1].strategy)
    return out


@pytest.mark.parametrize(("name", "base"), [("krum", Krum), ("multikrum", Krum), ("trimmedmean", FedTrimmedAvg)])
def test_robust_rules_compose_with_client_dp_and_the_detector(name: str, base: type, tmp_path: Path) -> None:
    cfg = robust_cfg(
        tmp_path, strategy={"name": name, "num_malicious": 3},
        privacy={"client": {"enabled": True, "noise_multiplier": 1.0}},
    )

    strategy = build_strategy(cfg, initial_parameters=START, evaluate_fn=None, recorder=RunRecorder(tmp_path))

    layers = chain(strategy)
    types = [type(layer) for layer in layers]
    assert AnomalyQuarantine in types and ClientEpsilonRecording in types and isinstance(layers[-1], base)
    quarantine = layers[types.index(AnomalyQuarantine)]
    assert quarantine.num_malicious == 3 and quarantine.excluded is layers[types.index(ClientExclusion)].excluded
    if base is Krum:
        assert layers[-1].num_malicious_clients == 3


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"strategy": {"name": "median"}, "secagg": {"method": "paillier", "key_dir": "k"}, "defense": {"name": "none"}},
            r"works only with strategy.name='fedavg'",
        ),
        (
            {"strategy": {"name": "trimmedmean"}, "privacy": {"central": {"enabled": True}}, "defense": {"name": "none"}},
            r"privacy.central.enabled works only",
        ),
        ({"strategy": {"name": "fedavg"}, "secagg": {"method": "paillier", "key_dir": "k"}}, r"defense.name='detect' does not combine with secagg"),
        ({"strategy": {"name": "fedavg"}, "privacy": {"central": {"enabled": True}}}, r"defense.name='detect' does not combine with privacy.central"),
    ],
)
def test_robustness_refuses_secure_aggregation_and_central_dp(sections: dict, message: str, tmp_path: Path) -> None:
    cfg = robust_cfg(tmp_path, **sections)

    with pytest.raises(ConfigError, match=message):
        check_strategy_config(cfg)


def test_defense_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"defense.name must be 'none' or 'detect'"):
        ExperimentConfig.from_dict({"defense": {"name": "firewall"}})
    with pytest.raises(ConfigError, match=r"defense.quarantine_below must be in \[0.0, 1.0\)"):
        ExperimentConfig.from_dict({"defense": {"quarantine_below": 1.0}})


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_scaling_attackers_are_flagged_and_quarantined_in_a_simulation(tmp_path: Path) -> None:
    from fedapp.simulation import run_in_simulation

    # Prepare: 6 clients, clients 1 and 4 boost their update 10x; trimmed mean + detector
    cfg = ExperimentConfig.from_dict(
        {
            "num_rounds": 3,
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 1200, "synthetic_test_size": 300},
            "model": {"name": "cnn_mnist_small"},
            "partition": {"num_clients": 6},
            "strategy": {"name": "trimmedmean", "beta": 0.2, "num_malicious": 2},
            "attack": {"name": "scaling", "clients": "1,4"},
            "defense": {"name": "detect", "release_after": 0},
            "runtime": {"output_dir": str(tmp_path)},
        }
    )

    # Execute
    run_in_simulation(cfg)

    # Assert
    events = read_jsonl(tmp_path / "events.jsonl")
    truth = [e for e in events if e["kind"] == "attack_ground_truth"]
    assert truth and truth[0]["malicious"] == ["1", "4"]
    assert {e["client"] for e in events if e["kind"] == "client_flagged"} == {"1", "4"}
    assert sorted(e["client"] for e in events if e["kind"] == "client_quarantined") == ["1", "4"]
    rows = {r["round"]: r for r in json.loads((tmp_path / "metrics.json").read_text())}
    assert rows[1]["detect_precision"] == rows[1]["detect_recall"] == 1.0
    assert rows[3]["fit_clients"] == 4 and rows[3]["quarantine_recall"] == 1.0
    scores = read_jsonl(tmp_path / "scores.jsonl")
    assert {s["client"] for s in scores if s["round"] == 3} == {"0", "2", "3", "5"}
