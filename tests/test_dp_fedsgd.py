"""Record-level DP-FedSGD: the noise is split into shares whose sum carries sigma, and it is booked.

What must hold (threat model in docs/privacy.md): one client's step is exactly
``-lr (sum of per-sample gradients clipped to C + N(0, (sigma C)^2 / (m-1))) / B``;
``m - 1`` clients' shares together carry sigma; the sample and the noise cannot
be redrawn from the experiment's seed; each client's ledger books one
``(sigma, q)`` step per round, checked against Google's dp-accounting; and the
combinations under which the shares would not protect anyone are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.common import RecordDict
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from fedapp.client_app import FedappClient
from fedapp.components import new_model
from fedapp.config import ClientDPConfig, ConfigError, ExperimentConfig
from fedapp.dp_fedsgd import SharedNoisePlan, noisy_gradient_step, plan_shared_noise
from fedapp.models import MnistSmallCNN
from fedapp.training import get_weights

DELTA = 1e-5
BITS = 512


def google_rdp_epsilon(z: float, q: float, steps: int, delta: float = DELTA) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps))
    return acc.get_epsilon(delta)


def plan(*, sigma: float = 2.0, counted: int = 9, q: float = 1.0, clip: float = 1.0, b: int = 20) -> SharedNoisePlan:
    return SharedNoisePlan(
        noise_multiplier=sigma, share_multiplier=sigma / math.sqrt(counted), shares_counted=counted,
        max_grad_norm=clip, sample_rate=q, normaliser=b, delta=DELTA, epsilon_budget=0.0, accountant="rdp",
    )


def tiny_data(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def step_of(model: nn.Module, data: TensorDataset, p: SharedNoisePlan, lr: float = 0.5) -> torch.Tensor:
    before = torch.cat([w.detach().flatten().clone() for w in model.parameters()])
    noisy_gradient_step(model, data, plan=p, lr=lr)
    return torch.cat([w.detach().flatten() for w in model.parameters()]) - before


# --- (a) one client's step is the clipped gradient sum, scaled by lr / B ------------------------


def test_step_is_minus_lr_times_the_clipped_per_sample_gradient_sum_over_b() -> None:
    # Prepare: every record sampled (q = 1), no noise; per-sample gradients computed independently
    torch.manual_seed(1)
    model, data, lr, clip, b = MnistSmallCNN(), tiny_data(), 0.5, 0.05, 25
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = data.tensors

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([per_sample[k].flatten(1) for k in params], dim=1)
    clipped = flat * (clip / flat.norm(dim=1, keepdim=True)).clamp(max=1.0)
    expected = -lr * clipped.sum(0) / b

    # Execute
    delta = step_of(model, data, replace(plan(clip=clip, b=b), share_multiplier=0.0), lr)

    # Assert: some gradients were really clipped, and the step matches to float precision
    assert (flat.norm(dim=1) > clip).all()
    assert torch.allclose(delta, expected, atol=1e-6)


# --- (b) the shares add up to sigma --------------------------------------------------------------


def test_m_minus_1_noise_shares_together_carry_sigma() -> None:
    # Prepare: nothing sampled (q ~ 0), so each step is its noise share alone
    sigma, counted, lr, clip, b = 2.0, 4, 0.5, 1.0, 20
    p = plan(sigma=sigma, counted=counted, q=1e-12, clip=clip, b=b)

    # Execute: four clients' steps from the same model, summed as the secure sum would
    shares = [step_of(MnistSmallCNN(), tiny_data(), p, lr) for _ in range(counted)]
    total = torch.stack(shares).sum(0)

    # Assert: one share has std lr sigma C / (b sqrt(m-1)); their sum lr sigma C / b (26k values: ~1 %)
    one = lr * sigma * clip / b
    assert shares[0].std().item() == pytest.approx(one / math.sqrt(counted), rel=0.03)
    assert total.std().item() == pytest.approx(one, rel=0.03)
    assert abs(total.mean().item()) < 0.05 * one


def test_sample_and_noise_cannot_be_redrawn_from_the_seed() -> None:
    # Prepare: the same model, data and global seed twice
    p = plan(q=0.5)
    deltas = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        deltas.append(step_of(MnistSmallCNN(), tiny_data(), p))

    # Assert: a server that knows cfg.seed cannot reproduce the step (and subtract its noise)
    assert not torch.allclose(deltas[0], deltas[1])


def test_local_dp_sgd_noise_cannot_be_redrawn_from_the_seed(tmp_path: Path) -> None:
    # Prepare: the classic mode (each client adds all its noise); two runs of one round, same seed
    cfg = ExperimentConfig.from_dict(
        {
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 300, "synthetic_test_size": 50},
            "partition": {"num_clients": 2},
            "model": {"name": "cnn_mnist_small"},
            "client": {"batch_size": 32, "lr": 0.1, "momentum": 0.0},
            "privacy": {"client": {"enabled": True, "noise_multiplier": 1.0}},
        }
    )
    weights = get_weights(new_model(cfg))

    # Execute
    a, _, _ = FedappClient(cfg, 0, RecordDict()).fit(weights, {"server_round": 1})
    b, _, _ = FedappClient(cfg, 0, RecordDict()).fit(weights, {"server_round": 1})

    # Assert
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


# --- (c) calibration and the ledger --------------------------------------------------------------


def test_plan_calibrates_sigma_for_the_whole_run_and_splits_it_over_m_minus_1_shares() -> None:
    # Prepare
    dp = ClientDPConfig(enabled=True, mode="distributed", sample_rate=0.1, target_epsilon=3.0, delta=DELTA)

    # Execute
    p = plan_shared_noise(dp, min_contributors=10, num_rounds=200, batch_size=540)

    # Assert: 200 steps at (sigma, q) spend at most the target (Opacus errs low by < 0.01), by Google's count
    spent = google_rdp_epsilon(p.noise_multiplier, 0.1, 200)
    assert 2.97 <= spent <= 3.0 + 0.03  # accountants differ by < 1 %
    assert p.shares_counted == 9
    assert p.share_multiplier * 3 == pytest.approx(p.noise_multiplier)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"sample_rate": 0.0}, "sample_rate"), ({"min_contributors": 1}, "min_contributors >= 2")],
)
def test_plan_refuses_what_would_give_no_guarantee(kwargs: dict, reason: str) -> None:
    dp = ClientDPConfig(enabled=True, mode="distributed", sample_rate=kwargs.get("sample_rate", 0.1), target_epsilon=3)
    with pytest.raises(ConfigError, match=reason):
        plan_shared_noise(dp, min_contributors=kwargs.get("min_contributors", 4), num_rounds=10, batch_size=30)


def fedsgd_experiment(tmp_path: Path, keys_dir: Path | None = None, **client_dp: object) -> ExperimentConfig:
    """Three clients of 180 training records; q = 1/6 -> expected batch 30."""
    return ExperimentConfig.from_dict(
        {
            "num_rounds": 3,
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 600, "synthetic_test_size": 100},
            "partition": {"num_clients": 3},
            "model": {"name": "cnn_mnist_small"},
            "client": {"batch_size": 30, "lr": 0.1, "momentum": 0.0},
            "secagg": {"method": "paillier", "key_dir": str(keys_dir or tmp_path / "keys"), "key_bits": BITS,
                       "min_contributors": 3},
            "runtime": {"output_dir": str(tmp_path / "run")},
            "privacy": {"client": {"enabled": True, "mode": "distributed", "sample_rate": 1 / 6,
                                   "noise_multiplier": 1.5, "delta": DELTA, **client_dp}},
        }
    )


def encrypted_round(tmp_path: Path, server_round: int) -> dict:
    """The fit config of a Paillier round (keys dealt under ``tmp_path/keys`` on first use): clients only train to encrypt."""
    from fedapp.crypto import load_public_key
    from fedapp.crypto.dealing import deal_federation, is_threshold_key_dir

    if not is_threshold_key_dir(tmp_path / "keys"):
        deal_federation(tmp_path / "keys", num_clients=3, threshold=2, min_contributors=3, bits=BITS)
    return {"server_round": server_round, "secagg.mode": "encrypt", "secagg.round": server_round,
            "secagg.key_id": load_public_key(tmp_path / "keys").key_id}


def test_each_round_books_one_step_at_sigma_and_q_across_new_client_objects(tmp_path: Path) -> None:
    # Prepare: a new client object per round (as Flower makes them), one node state
    cfg = fedsgd_experiment(tmp_path)
    state = RecordDict()
    weights = get_weights(new_model(cfg))

    # Execute
    replies = [FedappClient(cfg, 0, state).fit(weights, encrypted_round(tmp_path, r))[2] for r in (1, 2, 3)]

    # Assert: sigma (not the share) and q per round, cumulative, as Google's accountant computes
    assert [m["dp_steps"] for m in replies] == [1, 2, 3]
    for r, m in enumerate(replies, start=1):
        assert m["epsilon"] == pytest.approx(google_rdp_epsilon(1.5, 1 / 6, r), rel=0.01)
        assert m["noise_share_multiplier"] == pytest.approx(1.5 / math.sqrt(2))


def test_client_declines_the_round_that_would_pass_its_budget(tmp_path: Path) -> None:
    # Prepare: a budget between two and three rounds' epsilon
    budget = (google_rdp_epsilon(1.5, 1 / 6, 2) + google_rdp_epsilon(1.5, 1 / 6, 3)) / 2
    cfg = fedsgd_experiment(tmp_path, epsilon_budget=budget)
    state = RecordDict()
    weights = get_weights(new_model(cfg))
    for r in (1, 2):
        FedappClient(cfg, 1, state).fit(weights, encrypted_round(tmp_path, r))

    # Execute
    returned, n, metrics = FedappClient(cfg, 1, state).fit(weights, encrypted_round(tmp_path, 3))

    # Assert: an explicit decline, nothing spent
    assert metrics["declined"] == 1 and metrics["reason_code"] == "privacy_budget" and n == 0
    assert all(np.array_equal(a, b) for a, b in zip(returned, weights))
    assert metrics["epsilon"] == pytest.approx(google_rdp_epsilon(1.5, 1 / 6, 2), rel=0.01)


# --- (d) combinations that would protect nobody are refused --------------------------------------


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"secagg": {"method": "none"}}, "needs secagg.method='paillier'"),
        ({"secagg": {"min_contributors": 1}}, "min_contributors >= 2"),
        ({"secagg": {"noise_sigma_total": 1.0, "clip_norm": 1.0}}, "noise_sigma_total=0"),
        ({"secagg": {"max_weight": 4}}, "max_weight=1"),
        ({"client": {"momentum": 0.9}}, "one plain SGD step"),
        ({"client": {"local_epochs": 2}}, "one plain SGD step"),
        ({"client": {"optimizer": "adam"}}, "one plain SGD step"),
        ({"privacy": {"client": {"sample_rate": 0.0}}}, "sample_rate"),
        ({"privacy": {"client": {"mode": "shared"}}}, "privacy.client.mode must be one of"),
    ],
)
def test_invalid_distributed_client_dp_is_refused_with_its_reason(tmp_path: Path, override: dict, reason: str) -> None:
    raw = fedsgd_experiment(tmp_path).to_dict()
    for section, values in override.items():
        if section == "privacy":
            raw["privacy"]["client"].update(values["client"])
        else:
            raw[section].update(values)
    with pytest.raises(ConfigError, match=reason):
        ExperimentConfig.from_dict(raw)


# --- (e) end to end under Paillier ---------------------------------------------------------------


@pytest.mark.slow
def test_simulation_under_threshold_paillier_trains_books_every_round_and_releases_no_metric(tmp_path: Path) -> None:
    # Prepare: 3 clients, threshold keys dealt (any 2 of 3 decrypt), min_contributors 3 (shares sized for 2)
    from fedapp.crypto.dealing import deal_federation
    from fedapp.release import CLIENT_DP_DISTRIBUTED, FIT, SURFACES, Release
    from fedapp.simulation import run_in_simulation

    deal_federation(tmp_path / "keys", num_clients=3, threshold=2, min_contributors=3, bits=BITS)
    cfg = fedsgd_experiment(tmp_path)
    cfg.strategy.min_fit_clients = cfg.strategy.min_available_clients = 3

    # Execute
    run_in_simulation(cfg)

    # Assert: every round decrypted a sum of 3; each client's epsilon after 3 rounds is 3 steps at (sigma, q)
    out = Path(cfg.runtime.output_dir)
    rows = [r for r in json.loads((out / "metrics.json").read_text()) if r["round"] >= 1]
    assert [r["secagg_contributors"] for r in rows] == [3, 3, 3]
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    last = {c["partition_id"]: c["epsilon"] for c in clients if c.get("round") == 3 and "epsilon" in c}
    assert sorted(last) == [0, 1, 2]
    for eps in last.values():
        assert eps == pytest.approx(google_rdp_epsilon(1.5, 1 / 6, 3), rel=0.01)
    assert rows[-1]["epsilon_max"] == pytest.approx(google_rdp_epsilon(1.5, 1 / 6, 3), rel=0.01)
    # what the server stored is what left the clients: no loss, accuracy, sample size or clamp count,
    # and the same constant count from every client
    surface = SURFACES[CLIENT_DP_DISTRIBUTED]
    fit_rows = [c for c in clients if "epsilon" in c]
    assert fit_rows and all(c["num_examples"] == 1 for c in fit_rows)
    for row in fit_rows:
        for key in ("train_loss", "train_accuracy", "dp_batch", "secagg_clamped"):
            assert key not in row
            assert surface.status(FIT, key) is Release.NEVER


# --- (f) start-up warnings where the numbers make the guarantee weaker than it looks --------------


def test_fixed_point_too_coarse_for_the_noise_share_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: share std = lr sigma C / (B sqrt(m-1)) = 0.1 * 1.5 / (30 sqrt 2) = 3.5e-3; 4-bit step 2*1/15 = 0.13
    import logging

    from fedapp.components import check_shared_noise_dp

    cfg = fedsgd_experiment(tmp_path)
    cfg.secagg.bits = 4

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        check_shared_noise_dp(cfg, [180, 180, 180])

    # Assert
    messages = [r.getMessage() for r in caplog.records]
    assert any("raise secagg.bits / bound" in m for m in messages)
    assert not any("scaled off" in m for m in messages)  # q N = 30 = B: no divisor warning


def test_a_divisor_far_from_the_expected_batch_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from fedapp.components import check_shared_noise_dp

    cfg = fedsgd_experiment(tmp_path)
    cfg.client.batch_size = 100  # q N = 30

    with caplog.at_level(logging.WARNING, logger="flwr"):
        check_shared_noise_dp(cfg, [180, 180, 180])

    assert any("scaled off" in r.getMessage() for r in caplog.records)
