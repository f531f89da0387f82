"""Configuration: presets compose, defaults agree everywhere, bad values are refused early."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedapp.components import check_experiment
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.hydra_config import CONF_DIR, compose_experiment
from fedapp.runconfig import experiment_from_run_config, experiment_to_run_config, write_run_config_toml

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF_DIR.iterdir())
    if group.is_dir() and group.name != "experiment"
    for option in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_passes_the_full_check(preset: str) -> None:
    cfg = compose_experiment([f"+experiment={preset}"])

    check_experiment(cfg, load_data=False)

    assert cfg.name == preset


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option == "cnn_cifar10":
        overrides.append("dataset=synthetic_cifar10")
    if group == "dataset" and "cifar" in option:
        overrides.append("model=cnn_cifar10")

    cfg = compose_experiment(overrides)

    check_experiment(cfg, load_data=False)


def test_hydra_override_with_wrong_type_is_refused() -> None:
    with pytest.raises(Exception, match="num_clients"):
        compose_experiment(["partition.num_clients=many"])


def test_pyproject_flwr_defaults_equal_the_dataclass_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())

    flwr_defaults = pyproject["tool"]["flwr"]["app"]["config"]

    assert flwr_defaults == ExperimentConfig().to_dict()


def test_run_config_round_trip_through_flat_keys_and_toml(tmp_path: Path) -> None:
    cfg = compose_experiment(["+experiment=fedavg_mnist_dirichlet", "partition.alpha=0.1"])

    flat = experiment_to_run_config(cfg)
    path = write_run_config_toml(cfg, tmp_path / "exp.toml")

    assert flat["partition.alpha"] == 0.1
    assert experiment_from_run_config(flat) == cfg
    assert ExperimentConfig.from_dict(tomllib.loads(path.read_text())) == cfg


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"partition": {"alpha": 0.0}}, r"partition.alpha must be > 0"),
        ({"partition": {"alpha": -1.0}}, r"partition.alpha must be > 0"),
        ({"strategy": {"fraction_fit": 0.0}}, r"strategy.fraction_fit must be in \(0.0, 1.0\]"),
        ({"strategy": {"fraction_fit": 1.5}}, r"strategy.fraction_fit must be in \(0.0, 1.0\]"),
        ({"strategy": {"fraction_evaluate": -0.1}}, r"strategy.fraction_evaluate must be in \[0, 1\]"),
        ({"partition": {"num_clients": 2}, "strategy": {"min_fit_clients": 3}}, r"min_fit_clients=3 exceeds"),
        ({"num_rounds": 0}, r"num_rounds must be >= 1"),
        ({"client": {"lr": -0.1}}, r"client.lr must be > 0"),
        ({"runtime": {"mode": "cloud"}}, r"runtime.mode must be 'simulation' or 'processes'"),
        ({"partition": {"num_client": 3}}, r"unknown config key\(s\) \['num_client'\] in partition"),
        ({"partition": {"num_clients": "3"}}, r"partition.num_clients must be of type int"),
    ],
)
def test_impossible_values_are_refused_with_the_key_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dataset": {"name": "imagenet"}}, r"unknown dataset 'imagenet'; valid: \['cifar10', 'mnist'"),
        ({"model": {"name": "vgg"}}, r"unknown model 'vgg'; valid"),
        ({"strategy": {"name": "fedsgd"}}, r"unknown strategy 'fedsgd'; valid: \['fedavg', 'fedavgm', 'krum', 'median'"),
        ({"partition": {"name": "zipf"}}, r"unknown partition 'zipf'; valid"),
        ({"client": {"optimizer": "lbfgs"}}, r"unknown client.optimizer 'lbfgs'; valid"),
        (
            {"strategy": {"name": "krum", "num_malicious": 4}, "partition": {"num_clients": 10}},
            r"n > 2f \+ 2",
        ),
    ],
)
def test_unknown_names_and_invalid_combinations_fail_the_check(raw: dict, message: str) -> None:
    cfg = ExperimentConfig.from_dict(raw)

    with pytest.raises(ConfigError, match=message):
        check_experiment(cfg, load_data=False)


def test_more_clients_than_samples_fails_before_training() -> None:
    cfg = ExperimentConfig.from_dict(
        {"dataset": {"name": "synthetic-mnist", "synthetic_train_size": 40}, "partition": {"num_clients": 50}}
    )

    with pytest.raises(ConfigError, match="needs at least 50 training samples"):
        check_experiment(cfg)
