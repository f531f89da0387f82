"""Turn an :class:`ExperimentConfig` into data and models; check it before a run starts.

The one place that knows how a client id maps to its slice of the data, so the
simulation, the real SuperNodes and the tests all train on the same partitions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fedapp.attacks import resolve_attack
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.datasets import dataset_spec, labels_of, load_dataset
from fedapp.models import build_model, check_model
from fedapp.partition import check_partition_config, partition_indices, train_val_split
from fedapp.privacy import check_dp_model, plan_client_dp
from fedapp.training import OPTIMIZERS


def check_experiment(cfg: ExperimentConfig, *, load_data: bool = True) -> None:
    """Every name resolves and every size fits, or a :class:`ConfigError` says why.

    With ``load_data`` the data set is opened too (a missing data root then fails
    here, before any process or Ray worker is started).
    """
    from fedapp.strategies import check_strategy_config  # strategies import Flower; keep this lazy

    cfg.validate()
    spec = dataset_spec(cfg.dataset.name)
    check_model(cfg.model.name, spec)
    if cfg.client.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown client.optimizer {cfg.client.optimizer!r}; valid: {list(OPTIMIZERS)}")
    check_partition_config(cfg.partition)
    check_strategy_config(cfg)
    resolve_attack(cfg.attack.name)  # an unknown name or a dotted path that does not import fails here
    new_model(cfg)  # a model DP-SGD cannot train fails here, with Opacus's reasons
    if load_data:
        train, _ = load_dataset(cfg.dataset)
        check_partition_config(cfg.partition, len(train))
        if cfg.privacy.client.enabled:
            check_client_dp(cfg)


def check_client_dp(cfg: ExperimentConfig) -> None:
    """Calibrate every client's DP-SGD plan now, so an unreachable target stops the run early.

    The delta warning is given once, for the smallest client (the one it concerns most).
    """
    sizes = sorted({len(client_data(cfg, pid)[0]) for pid in range(cfg.partition.num_clients)})
    for size in sizes:
        plan_client_dp(
            cfg.privacy.client,
            num_samples=size,
            batch_size=cfg.client.batch_size,
            local_epochs=cfg.client.local_epochs,
            num_rounds=cfg.num_rounds,
            warn=size == sizes[0],
        )


def new_model(cfg: ExperimentConfig) -> nn.Module:
    """The experiment's model, initialised from ``cfg.seed`` (same on every process).

    With client DP on, Opacus must accept it (or fix it, when allowed); server and
    clients call this same function, so their weights keep the same shapes.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, dataset_spec(cfg.dataset.name))
    if cfg.privacy.client.enabled:
        model = check_dp_model(model, fix=cfg.privacy.client.fix_model)
    return model


def client_data(cfg: ExperimentConfig, partition_id: int) -> tuple[Subset, Subset]:
    """Client ``partition_id``'s local train and validation sets."""
    if not 0 <= partition_id < cfg.partition.num_clients:
        raise ConfigError(
            f"partition-id {partition_id} is outside [0, {cfg.partition.num_clients}) "
            "(partition.num_clients)"
        )
    train, _ = load_dataset(cfg.dataset)
    parts = _partitions(cfg)
    local_train, local_val = train_val_split(parts[partition_id], cfg.dataset.val_fraction, seed=cfg.seed + partition_id)
    return Subset(train, local_train.tolist()), Subset(train, local_val.tolist())


def test_data(cfg: ExperimentConfig) -> TensorDataset:
    """The held-out test set the server evaluates on."""
    return load_dataset(cfg.dataset)[1]


_PARTITION_CACHE: dict[tuple[str, str], list] = {}


def _partitions(cfg: ExperimentConfig) -> list:
    """Index arrays of all clients, computed once per process and configuration."""
    key = (repr(cfg.dataset), repr(cfg.partition))
    if key not in _PARTITION_CACHE:
        train, _ = load_dataset(cfg.dataset)
        _PARTITION_CACHE[key] = partition_indices(labels_of(train), cfg.partition)
    return _PARTITION_CACHE[key]
