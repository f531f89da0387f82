"""Data: real MNIST through torchvision, clear errors when it is missing, client slices."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedapp.components import client_data
from fedapp.config import ConfigError, DatasetConfig, ExperimentConfig
from fedapp.datasets import DATA_ROOT_ENV, DataUnavailableError, load_dataset, resolve_root
from tests.conftest import needs_mnist


def test_missing_data_without_download_names_folder_and_files(tmp_path: Path) -> None:
    root = tmp_path / "empty"

    with pytest.raises(DataUnavailableError) as info:
        load_dataset(DatasetConfig(name="mnist", root=str(root), download=False))

    message = str(info.value)
    assert str(root) in message
    assert "MNIST/raw/train-images-idx3-ubyte" in message
    assert "dataset.download is off" in message


def test_root_comes_from_config_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))

    assert resolve_root("") == (tmp_path / "env").resolve()
    assert resolve_root(str(tmp_path / "cfg")) == (tmp_path / "cfg").resolve()


@needs_mnist
def test_full_mnist_loads_normalised_from_the_shared_root() -> None:
    train, test = load_dataset(DatasetConfig(name="mnist", download=False))

    assert train.tensors[0].shape == (60_000, 1, 28, 28)
    assert test.tensors[0].shape == (10_000, 1, 28, 28)
    assert abs(float(train.tensors[0].mean())) < 0.01  # standardised
    assert sorted(train.tensors[1].unique().tolist()) == list(range(10))


def test_client_slices_are_disjoint_and_cover_the_training_set() -> None:
    cfg = ExperimentConfig.from_dict(
        {"dataset": {"name": "synthetic-mnist", "synthetic_train_size": 500}, "partition": {"num_clients": 4}}
    )

    slices = [client_data(cfg, i) for i in range(4)]
    indices = [set(t.indices) | set(v.indices) for t, v in slices]

    assert sum(len(s) for s in indices) == 500
    assert set().union(*indices) == set(range(500))
    assert all(len(v) == round(0.1 * (len(t) + len(v))) for t, v in slices)


def test_partition_id_outside_the_experiment_is_refused() -> None:
    cfg = ExperimentConfig.from_dict({"dataset": {"name": "synthetic-mnist"}, "partition": {"num_clients": 4}})

    with pytest.raises(ConfigError, match=r"partition-id 4 is outside \[0, 4\)"):
        client_data(cfg, 4)
