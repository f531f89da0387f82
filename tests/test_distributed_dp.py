"""Distributed DP under Paillier: the noise shares are in the decrypted sum, and they are accounted.

Each client adds ``N(0, sigma^2 / n)`` before encrypting; a decrypted sum of ``k``
updates carries ``sigma * sqrt(k / n)``, booked per released round as user-level
DP (sensitivity ``clip_norm``). Keys are 512 bits (insecure, fast), made once.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAvg

from fedapp.config import ConfigError, ExperimentConfig, SecAggConfig
from fedapp.crypto import add_encrypted, decrypt_aggregate, encrypt_vector, generate_keypair, save_keypair
from fedapp.crypto.protocol import settings_for
from fedapp.dp_strategy import DistributedDPAccounting, distributed_noise_multiplier
from fedapp.metrics import RunRecorder
from fedapp.strategies import build_strategy

BITS = 512
DELTA = 1e-5


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(BITS)


def google_rdp_epsilon(steps: list[tuple[float, float]], delta: float = DELTA) -> float:
    """Epsilon of Poisson-subsampled Gaussian steps ``(z, q)``, by Google's dp-accounting (not Opacus)."""
    acc = rdp.RdpAccountant()
    for z, q in steps:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


class FakeSecureSum(FedAvg):
    """Stands in for PaillierSecureAggregation: releases a model and how many updates its sum holds."""

    def __init__(self, contributors: dict[int, int | None], *, report: bool = True) -> None:
        super().__init__()
        self.contributors, self.report = contributors, report

    def aggregate_fit(self, server_round, results, failures):
        k = self.contributors[server_round]
        if k is None:  # e.g. no decryptor answered: nothing released
            return None, {}
        return ndarrays_to_parameters([np.zeros(2)]), ({"secagg_contributors": k} if self.report else {})


def accounting(contributors, recorder=None, *, m=4, num_clients=4, sigma=2.0, clip=0.5, n=4):
    return DistributedDPAccounting(
        FakeSecureSum(contributors), noise_sigma_total=sigma, clip_norm=clip, calibrated_for=n,
        num_sampled_clients=m, num_clients=num_clients, delta=DELTA, recorder=recorder,
    )


# --- (a) the ledger adds up ---------------------------------------------------------------


def test_noise_multiplier_by_hand() -> None:
    # sigma 2 split over n = 16 shares; k = 4 of them in the sum: std 2 * sqrt(4/16) = 1; C = 0.5 -> z = 2
    assert distributed_noise_multiplier(2.0, contributors=4, calibrated_for=16, clip_norm=0.5) == pytest.approx(2.0)
    assert distributed_noise_multiplier(2.0, contributors=16, calibrated_for=16, clip_norm=0.5) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="contributors"):
        distributed_noise_multiplier(2.0, contributors=17, calibrated_for=16, clip_norm=0.5)


def test_epsilon_after_rounds_equals_an_independent_computation(tmp_path: Path) -> None:
    # Prepare: shares for n = 4, sigma 2, C = 0.5; m = 2 of 4 clients sampled (q = 0.5); k = 2, 2, 1
    recorder = RunRecorder(tmp_path)
    strategy = accounting({1: 2, 2: 2, 3: 1}, recorder, m=2)

    # Execute
    for rnd in (1, 2, 3):
        strategy.aggregate_fit(rnd, [], [])

    # Assert: z = 2 * sqrt(k/4) / 0.5 -> 2.83, 2.83, 2.0
    zs = [4 * math.sqrt(k / 4) for k in (2, 2, 1)]
    for rnd in (1, 2, 3):
        row = recorder.rows[rnd]
        assert row["dp_mode"] == "distributed"
        assert row["distributed_noise_multiplier"] == pytest.approx(zs[rnd - 1])
        # against the server, which picks the clients: no amplification (q = 1)
        assert row["central_epsilon"] == pytest.approx(google_rdp_epsilon([(z, 1.0) for z in zs[:rnd]]), rel=0.01)
        # against observers of the released models only: subsampled at q = m / N = 0.5, as central DP
        assert row["released_epsilon"] == pytest.approx(google_rdp_epsilon([(z, 0.5) for z in zs[:rnd]]), rel=0.01)
        assert row["released_epsilon"] < row["central_epsilon"]
    epsilons = [recorder.rows[rnd]["central_epsilon"] for rnd in (1, 2, 3)]
    assert epsilons == sorted(set(epsilons))  # strictly increasing


def test_dropped_contributors_cost_more_epsilon_than_full_participation(tmp_path: Path) -> None:
    # Prepare: the same five rounds with all 4 shares in the sum, and with only 2 (two clients dropped)
    full, dropped = RunRecorder(tmp_path / "full"), RunRecorder(tmp_path / "dropped")
    full_strategy = accounting(dict.fromkeys(range(1, 6), 4), full)
    dropped_strategy = accounting(dict.fromkeys(range(1, 6), 2), dropped)

    # Execute
    for rnd in range(1, 6):
        full_strategy.aggregate_fit(rnd, [], [])
        dropped_strategy.aggregate_fit(rnd, [], [])

    # Assert: half the shares -> noise / sqrt(2) -> more epsilon
    assert dropped.rows[5]["central_epsilon"] > 1.2 * full.rows[5]["central_epsilon"]
    assert full.rows[5]["central_epsilon"] == pytest.approx(google_rdp_epsilon([(4.0, 1.0)] * 5), rel=0.01)
    assert "released_epsilon" not in full.rows[5]  # every client sampled: one epsilon only


def test_a_round_that_releases_nothing_spends_nothing(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path)
    strategy = accounting({1: 4, 2: None, 3: 4}, recorder)

    for rnd in (1, 2, 3):
        strategy.aggregate_fit(rnd, [], [])

    assert 2 not in recorder.rows
    assert recorder.rows[3]["central_epsilon"] == pytest.approx(google_rdp_epsilon([(4.0, 1.0)] * 2), rel=0.01)


def test_a_release_without_a_contributor_count_is_an_error() -> None:
    strategy = DistributedDPAccounting(
        FakeSecureSum({1: 3}, report=False), noise_sigma_total=1.0, clip_norm=1.0, calibrated_for=4,
        num_sampled_clients=4, num_clients=4, delta=DELTA,
    )
    with pytest.raises(RuntimeError, match="PaillierSecureAggregation directly"):
        strategy.aggregate_fit(1, [], [])


# --- (b) the noise is in the decrypted aggregate --------------------------------------------


def test_decrypted_sum_carries_the_noise_the_ledger_books(keys) -> None:
    # Prepare: shares sized for n = 6 clients, sigma_total 0.6 (each share std 0.245), zero updates
    public, private = keys
    n, sigma, values = 6, 0.6, 4000
    sa = SecAggConfig(method="paillier", key_bits=BITS, bits=16, bound=2.0, clip_norm=1.0, noise_sigma_total=sigma)
    settings = settings_for(sa, n)
    messages = [
        encrypt_vector(
            np.zeros(values), public_key=public, layout=settings.layout, quantizer=settings.quantizer,
            server_round=1, sender=f"c{i}", private_key=private, noise_std=settings.noise_std,
            rng=np.random.default_rng(i),
        )
        for i in range(n)
    ]

    # Execute: what the server has decrypted with all 6 senders, with 3 (three dropped), and one alone
    full, _ = decrypt_aggregate(add_encrypted(messages, public), private)
    half, _ = decrypt_aggregate(add_encrypted(messages[:3], public), private)
    alone, _ = decrypt_aggregate(messages[0], private)

    # Assert: std sigma * sqrt(k / n), within 5 % (the standard error of 4000 samples is 1.1 %)
    assert settings.noise_std == pytest.approx(sigma / math.sqrt(n))
    assert np.std(full) == pytest.approx(sigma, rel=0.05)  # the server-visible sum carries the full sigma
    assert np.std(half) == pytest.approx(sigma * math.sqrt(3 / n), rel=0.05)
    assert np.std(alone) == pytest.approx(sigma / math.sqrt(n), rel=0.05)  # one share alone: sigma / sqrt(n)
    assert abs(np.mean(full)) < 4 * sigma / math.sqrt(values)
    # the ledger's z times the sensitivity is exactly that std
    z = distributed_noise_multiplier(sigma, contributors=3, calibrated_for=n, clip_norm=sa.clip_norm)
    assert np.std(half) == pytest.approx(z * sa.clip_norm, rel=0.05)
    # a decryptor knows its own share: against it the sum carries sigma * sqrt((k - 1) / n)
    assert np.std(full - alone) == pytest.approx(sigma * math.sqrt((n - 1) / n), rel=0.05)


def test_clipping_bounds_what_one_client_adds_to_the_sum(keys) -> None:
    # Prepare: a client update of norm 50 (all in one coordinate) under clip_norm 1, no noise
    public, private = keys
    sa = SecAggConfig(method="paillier", key_bits=BITS, bits=16, bound=2.0, clip_norm=1.0)
    settings = settings_for(sa, 2)
    update = np.zeros(10)
    update[3] = 50.0
    msgs = [
        encrypt_vector(
            v, public_key=public, layout=settings.layout, quantizer=settings.quantizer, server_round=1,
            sender=f"c{i}", private_key=private,
        )
        for i, v in enumerate((update, np.zeros(10)))
    ]

    # Execute
    total, _ = decrypt_aggregate(add_encrypted(msgs, public), private)

    # Assert: the sum moved by clip_norm (up to rounding), the sensitivity the ledger assumes
    assert np.linalg.norm(total) == pytest.approx(1.0, abs=math.sqrt(10) * settings.quantizer.error_bound(2))


# --- (c) invalid combinations are refused with the reason -----------------------------------


def _config(secagg: dict, privacy: dict | None = None) -> dict:
    return {"partition": {"num_clients": 4}, "secagg": secagg, "privacy": privacy or {}}


PAILLIER = {"method": "paillier", "key_dir": "keys", "clip_norm": 1.0, "noise_sigma_total": 1.0}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_config({"method": "none", "noise_sigma_total": 1.0}), r"needs secagg.method='paillier'.*privacy=central"),
        (_config({"method": "secaggplus", "noise_sigma_total": 1.0}), r"needs secagg.method='paillier'"),
        (_config({**PAILLIER, "clip_norm": 0.0}), r"needs secagg.clip_norm > 0.*sensitivity"),
        (_config({**PAILLIER, "max_weight": 4}), r"needs secagg.max_weight=1.*w x clip_norm"),
        (
            _config(PAILLIER, {"central": {"enabled": True}}),
            r"privacy.central.enabled do not combine.*sees only the encrypted sum",
        ),
        (_config({"method": "none", "noise_sigma_total": -1.0}), r"noise_sigma_total must be >= 0"),
        (_config({**PAILLIER, "noise_sigma_total": -1.0}), r"noise_sigma_total >= 0"),
        (_config({**PAILLIER, "noise_delta": 0.0}), r"secagg.noise_delta must be in"),
        (_config({**PAILLIER, "noise_delta": 1.0}), r"secagg.noise_delta must be in"),
    ],
)
def test_invalid_distributed_dp_config_is_refused_with_its_reason(raw: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        ExperimentConfig.from_dict(raw)


def test_valid_distributed_dp_config_is_accepted() -> None:
    cfg = ExperimentConfig.from_dict(_config(PAILLIER))

    assert cfg.secagg.noise_sigma_total == 1.0 and cfg.secagg.noise_delta == DELTA


def test_build_strategy_puts_the_accounting_directly_outside_paillier(tmp_path: Path, keys) -> None:
    # Prepare
    save_keypair(tmp_path / "keys", keys[0])
    cfg = ExperimentConfig.from_dict(
        _config({**PAILLIER, "key_dir": str(tmp_path / "keys"), "key_bits": BITS, "bound": 4.0})
    )

    # Execute
    strategy = build_strategy(cfg, initial_parameters=[np.zeros(2)], evaluate_fn=None, recorder=RunRecorder(tmp_path))

    # Assert
    chain = []
    while hasattr(strategy, "strategy"):
        chain.append(type(strategy).__name__)
        strategy = strategy.strategy
    assert chain == ["MetricsRecording", "ClientExclusion", "DistributedDPAccounting", "PaillierSecureAggregation"]


def test_a_noise_share_near_the_bound_is_warned_about(tmp_path: Path, keys, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: sigma 2 over 4 clients -> share std 1.0, bound 1: noisy coordinates get clipped often
    import logging

    save_keypair(tmp_path / "keys", keys[0])
    secagg = {**PAILLIER, "noise_sigma_total": 2.0, "key_dir": str(tmp_path / "keys"), "key_bits": BITS}
    cfg = ExperimentConfig.from_dict(_config(secagg))

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        build_strategy(cfg, initial_parameters=[np.zeros(2)], evaluate_fn=None, recorder=RunRecorder(tmp_path))

    # Assert
    assert any("raise secagg.bound" in r.getMessage() for r in caplog.records)


# --- (d) end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_simulation_records_distributed_epsilon_per_round(tiny_experiment: ExperimentConfig, tmp_path: Path) -> None:
    # Prepare: 4 clients, 3 sampled per round (k = 3 of n = 4 shares), sigma 0.05, C = 0.05 -> z = sqrt(3/4);
    # threshold keys (any 2 of 4 decrypt), each sum needs 3 signed updates (m > t)
    # (small C and sigma keep the model finite; the epsilon depends only on their ratio)
    from fedapp.simulation import run_in_simulation

    from fedapp.crypto.dealing import deal_federation

    deal_federation(tmp_path / "keys", num_clients=4, threshold=2, min_contributors=3, bits=BITS)
    cfg = replace(
        tiny_experiment,
        partition=replace(tiny_experiment.partition, num_clients=4),
        strategy=replace(tiny_experiment.strategy, fraction_fit=0.75, min_fit_clients=3, min_available_clients=4),
        secagg=replace(
            tiny_experiment.secagg, method="paillier", key_dir=str(tmp_path / "keys"), key_bits=BITS,
            clip_norm=0.05, noise_sigma_total=0.05, min_contributors=3,
        ),
    )
    cfg.validate()

    # Execute
    summary = run_in_simulation(cfg)

    # Assert
    out = Path(cfg.runtime.output_dir)
    rows = [r for r in json.loads((out / "metrics.json").read_text()) if r["round"] >= 1]
    assert [r["round"] for r in rows] == [1, 2, 3]
    z = math.sqrt(3 / 4)
    for i, row in enumerate(rows, start=1):
        assert row["secagg_contributors"] == 3 and row["dp_mode"] == "distributed"
        assert row["distributed_noise_multiplier"] == pytest.approx(z)
        assert row["central_epsilon"] == pytest.approx(google_rdp_epsilon([(z, 1.0)] * i), rel=0.01)
        assert row["released_epsilon"] == pytest.approx(google_rdp_epsilon([(z, 3 / 4)] * i), rel=0.01)
    assert rows[0]["central_epsilon"] < rows[1]["central_epsilon"] < rows[2]["central_epsilon"]
    assert summary["final_central_epsilon"] == rows[-1]["central_epsilon"]
    assert summary["central_dp_mode"] == "distributed"
    assert summary["final_released_epsilon"] == rows[-1]["released_epsilon"]
    assert (out / "epsilon.png").stat().st_size > 0


def test_report_labels_the_user_level_epsilon_as_distributed(tmp_path: Path) -> None:
    # Prepare: two rounds as DistributedDPAccounting records them
    from fedapp.report import format_privacy_utility, plot_privacy_utility, privacy_utility_rows, write_report

    run = tmp_path / "run"
    recorder = RunRecorder(run)
    for rnd, eps in ((1, 2.2), (2, 3.1)):
        recorder.record(rnd, central_epsilon=eps, dp_mode="distributed", test_accuracy=0.5, test_loss=1.0)
    (run / "experiment.json").write_text(json.dumps({"privacy": {"client": {"enabled": False}}}))

    # Execute
    summary = write_report(recorder.table(), run)
    rows = privacy_utility_rows([run])

    # Assert
    assert summary["final_central_epsilon"] == 3.1 and summary["central_dp_mode"] == "distributed"
    assert rows[0]["user_level_epsilon"] == 3.1 and rows[0]["user_level_dp"] == "distributed"
    assert "3.100 (distributed)" in format_privacy_utility(rows)
    assert (run / "epsilon.png").stat().st_size > 0
    assert plot_privacy_utility(rows, tmp_path / "pu.png").stat().st_size > 0
