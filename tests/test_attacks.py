"""Attacks: robust rules on hand-built updates; simulated attackers change only their own updates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg
from torch.utils.data import Subset, TensorDataset

from fedapp.attacks import (
    ALIE,
    ATTACKS,
    Attack,
    AttackContext,
    LabelFlip,
    Scaling,
    SignFlip,
    alie_z_max,
    malicious_clients,
    poison_weights,
    resolve_attack,
)
from fedapp.client_app import FedappClient, poisoned_labels
from fedapp.components import check_experiment
from fedapp.config import AttackConfig, ConfigError, ExperimentConfig

# ---------------------------------------------------------------- robust rules (Flower's own functions)


def test_krum_selects_the_update_with_the_closest_neighbours() -> None:
    # Prepare: 1-D updates 0, 2, 3, 7, 30; f = 1 -> each is scored on its n - f - 2 = 2 nearest.
    # Squared distances to the 2 nearest: 0 -> 4 + 9 = 13; 2 -> 1 + 4 = 5; 3 -> 1 + 9 = 10;
    # 7 -> 16 + 25 = 41; 30 -> 529 + 729 = 1258. Krum picks 2; Multi-Krum (m = 2) averages 2 and 3.
    results = [([np.array([v], dtype=np.float64)], 10) for v in (0.0, 2.0, 3.0, 7.0, 30.0)]

    # Execute
    krum = aggregate_krum(results, num_malicious=1, to_keep=0)
    multikrum = aggregate_krum(results, num_malicious=1, to_keep=2)

    # Assert
    np.testing.assert_array_equal(krum[0], [2.0])
    np.testing.assert_allclose(multikrum[0], [2.5])


def test_trimmed_mean_and_median_ignore_the_extremes() -> None:
    # Prepare: five clients, two of them extreme; beta = 0.2 cuts int(0.2 * 5) = 1 value per side
    results = [([np.array([v, 10 * v])], 1) for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]

    # Execute
    trimmed = aggregate_trimmed_avg(results, proportiontocut=0.2)
    median = aggregate_median(results)

    # Assert: mean of (1, 2, 3) = 2 and of (10, 20, 30) = 20; the median is the same here
    np.testing.assert_allclose(trimmed[0], [2.0, 20.0])
    np.testing.assert_allclose(median[0], [2.0, 20.0])


# ---------------------------------------------------------------- attacks as functions


def context(cfg: AttackConfig | None = None, *, pid: int = 0, malicious: tuple[int, ...] = (0,), **kw) -> AttackContext:
    return AttackContext(
        partition_id=pid,
        server_round=1,
        malicious=malicious,
        num_clients=kw.pop("num_clients", 10),
        num_classes=10,
        config=cfg or AttackConfig(name="scaling", fraction=0.1),
        rng=np.random.default_rng(0),
        **kw,
    )


def test_update_attacks_on_a_hand_built_update() -> None:
    # Prepare
    update = [np.array([1.0, -2.0], dtype=np.float32)]
    ctx = context(AttackConfig(name="scaling", fraction=0.1, scale=3.0))

    # Execute
    flipped = SignFlip().poison_update(update, ctx)
    scaled = Scaling().poison_update(update, ctx)

    # Assert
    np.testing.assert_array_equal(flipped[0], [-1.0, 2.0])
    np.testing.assert_array_equal(scaled[0], [3.0, -6.0])


def test_label_flip_maps_y_to_num_classes_minus_one_minus_y() -> None:
    labels = np.array([0, 3, 9])

    flipped = LabelFlip().poison_labels(labels, context())

    np.testing.assert_array_equal(flipped, [9, 6, 0])


def test_alie_sends_mean_minus_z_std_of_the_colluders_honest_updates() -> None:
    # Prepare: colluders 0 and 1 with honest updates [1, 4] and [3, 0]: mean [2, 2], std [1, 2]
    honest = {0: [np.array([1.0, 4.0])], 1: [np.array([3.0, 0.0])]}
    cfg = AttackConfig(name="alie", fraction=0.2, z=1.5)
    ctx = context(cfg, pid=0, malicious=(0, 1), honest_update_of=lambda pid: honest[pid])

    # Execute
    sent = ALIE().poison_update(honest[0], ctx)

    # Assert: [2 - 1.5 * 1, 2 - 1.5 * 2]
    np.testing.assert_allclose(sent[0], [0.5, -1.0])


def test_alie_z_max_matches_the_paper_for_20_clients_and_4_attackers() -> None:
    # s = floor(20 / 2 + 1) - 4 = 7; z_max = Phi^-1((20 - 7) / 20) = Phi^-1(0.65) = 0.3853
    assert alie_z_max(20, 4) == pytest.approx(0.3853, abs=1e-4)


def test_poison_weights_leaves_integer_buffers_alone() -> None:
    old = [np.array([1.0, 1.0], dtype=np.float32), np.array([5], dtype=np.int64)]
    new = [np.array([2.0, 0.0], dtype=np.float32), np.array([6], dtype=np.int64)]

    sent = poison_weights(SignFlip(), old, new, context())

    np.testing.assert_array_equal(sent[0], [0.0, 2.0])  # 1 - (+1), 1 - (-1)
    np.testing.assert_array_equal(sent[1], [6])
    assert sent[0].dtype == np.float32


# ---------------------------------------------------------------- who is malicious


def test_malicious_clients_are_drawn_by_seed_or_listed() -> None:
    drawn = malicious_clients(AttackConfig(name="signflip", fraction=0.2, seed=7), 20)
    again = malicious_clients(AttackConfig(name="signflip", fraction=0.2, seed=7), 20)
    listed = malicious_clients(AttackConfig(name="signflip", clients="3, 1"), 20)
    nobody = malicious_clients(AttackConfig(name="none", fraction=0.2), 20)

    assert len(drawn) == 4 and len(set(drawn)) == 4 and drawn == again
    assert all(0 <= c < 20 for c in drawn)
    assert listed == (1, 3)
    assert nobody == ()


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ({"name": "signflip", "fraction": 1.0}, r"attack.fraction must be in \[0.0, 1.0\)"),
        ({"name": "signflip", "fraction": -0.1}, r"attack.fraction must be in"),
        ({"name": "signflip", "clients": "1,x"}, r"attack.clients must be partition ids"),
        ({"name": "signflip", "clients": "2,12"}, r"outside \[0, 10\)"),
        ({"name": "signflip", "fraction": 0.05}, r"no client is malicious"),
        ({"name": "scaling", "fraction": 0.2, "scale": 0.0}, r"attack.scale"),
    ],
)
def test_bad_attack_settings_are_refused(attack: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"attack": attack})


def test_unknown_attack_name_lists_the_valid_ones() -> None:
    cfg = ExperimentConfig.from_dict({"attack": {"name": "backdoor", "fraction": 0.2}})

    with pytest.raises(ConfigError, match=r"unknown attack.name 'backdoor'; valid: \['none', 'alie', 'gaussian'"):
        check_experiment(cfg, load_data=False)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_pkg.mod:attack", r"module 'no_such_pkg.mod' does not import"),
        ("tests.test_attacks:missing", r"has no attribute 'missing'"),
        ("tests.test_attacks:NotAnAttack", r"does not subclass fedapp.attacks.Attack"),
    ],
)
def test_dotted_path_that_does_not_resolve_says_why(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_attack(name)


# ---------------------------------------------------------------- on real clients (tiny synthetic data)


def zero_update(update: list[np.ndarray], ctx: AttackContext) -> list[np.ndarray]:
    """A custom attack for the dotted-path test: send no change at all (a free rider)."""
    return [np.zeros_like(u) for u in update]


class NotAnAttack:
    pass


def tiny(tmp_path: Path, attack: dict) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 200, "synthetic_test_size": 50},
            "model": {"name": "cnn_mnist_small"},
            "partition": {"num_clients": 4},
            "client": {"batch_size": 16},
            "runtime": {"output_dir": str(tmp_path)},
            "attack": attack,
        }
    )


def fit_all(cfg: ExperimentConfig, start: list[np.ndarray]) -> list[list[np.ndarray]]:
    return [FedappClient(cfg, pid).fit(start, {"server_round": 1})[0] for pid in range(cfg.partition.num_clients)]


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    cfg = tiny(tmp_path_factory.mktemp("honest"), {"name": "none"})
    start = FedappClient(cfg, 0).get_parameters({})
    return start, fit_all(cfg, start)


def deltas(weights: list[np.ndarray], start: list[np.ndarray]) -> list[np.ndarray]:
    return [w - s for w, s in zip(weights, start)]


@pytest.mark.parametrize("name", sorted(ATTACKS) + ["tests.test_attacks:zero_update"])
def test_attack_changes_only_the_malicious_clients_updates(
    name: str, honest_run: tuple[list[np.ndarray], list[list[np.ndarray]]], tmp_path: Path
) -> None:
    # Prepare: clients 1 and 2 are malicious, 0 and 3 honest
    start, honest = honest_run
    cfg = tiny(tmp_path, {"name": name, "clients": "1,2", "scale": 4.0, "sigma": 0.5})

    # Execute
    attacked = fit_all(cfg, start)

    # Assert: honest clients send exactly what they send without an attack
    for pid in (0, 3):
        for a, h in zip(attacked[pid], honest[pid]):
            np.testing.assert_array_equal(a, h)
    for pid in (1, 2):
        assert any(not np.allclose(a, h) for a, h in zip(attacked[pid], honest[pid])), f"{name}: client {pid}"
    sent = {pid: deltas(attacked[pid], start) for pid in (1, 2)}
    truth = {pid: deltas(honest[pid], start) for pid in (1, 2)}
    if name == "signflip":
        np.testing.assert_allclose(sent[1][0], -truth[1][0], atol=1e-6)
    if name == "scaling":
        np.testing.assert_allclose(sent[2][0], 4.0 * truth[2][0], rtol=1e-4, atol=1e-6)
    if name == "gaussian":
        assert np.std(np.concatenate([d.ravel() for d in sent[1]])) == pytest.approx(0.5, rel=0.05)
    if name == "alie":  # both colluders send mean - z * std of their two honest updates, z = z_max(4, 2)
        z = alie_z_max(4, 2)  # s = 3 - 2 = 1, Phi^-1(3 / 4) = 0.674
        expected = (truth[1][0] + truth[2][0]) / 2 - z * np.abs(truth[1][0] - truth[2][0]) / 2
        np.testing.assert_allclose(sent[1][0], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(attacked[1][0], attacked[2][0])
    if name.endswith(":zero_update"):
        for a, s in zip(attacked[1], start):
            np.testing.assert_array_equal(a, s)


def test_fit_metrics_do_not_reveal_the_attacker(
    honest_run: tuple[list[np.ndarray], list[list[np.ndarray]]], tmp_path: Path
) -> None:
    start, _ = honest_run
    cfg = tiny(tmp_path, {"name": "scaling", "clients": "1"})

    honest_keys = set(FedappClient(cfg, 0).fit(start, {"server_round": 1})[2])
    malicious_keys = set(FedappClient(cfg, 1).fit(start, {"server_round": 1})[2])

    assert malicious_keys == honest_keys == {"partition_id", "train_loss", "train_accuracy"}


def test_label_flip_poisons_only_the_malicious_clients_labels(tmp_path: Path) -> None:
    # Prepare: a 4-sample data set; the client holds samples 1 and 3 (labels 2 and 7)
    data = TensorDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 2, 5, 7]))
    mine = Subset(data, [1, 3])
    cfg = tiny(tmp_path, {"name": "labelflip", "clients": "1"})
    attacker = FedappClient(cfg, 1)
    honest = FedappClient(cfg, 0)

    # Execute
    flipped = poisoned_labels(mine, LabelFlip(), context(pid=1, malicious=(1,)))

    # Assert: 9 - 2 = 7, 9 - 7 = 2; the shared data set is untouched; only client 1 carries the attack
    assert flipped[0][1].item() == 7 and flipped[1][1].item() == 2
    assert data.tensors[1].tolist() == [0, 2, 5, 7]
    assert isinstance(attacker.attack, LabelFlip) and honest.attack is None


class Doubler(Attack):
    """A class-based custom attack: doubles the update."""

    def poison_update(self, update: list[np.ndarray], ctx: AttackContext) -> list[np.ndarray]:
        return [2 * u for u in update]


def test_custom_attack_class_by_dotted_path(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, {"name": "tests.test_attacks:Doubler", "clients": "0"})
    check_experiment(cfg, load_data=False)
    start = FedappClient(cfg, 1).get_parameters({})

    sent = FedappClient(cfg, 0).fit(start, {"server_round": 1})[0]
    honest = FedappClient(replace(cfg, attack=AttackConfig()), 0).fit(start, {"server_round": 1})[0]

    np.testing.assert_allclose(sent[0] - start[0], 2 * (honest[0] - start[0]), rtol=1e-4, atol=1e-7)
