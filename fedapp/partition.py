"""Split sample indices over clients: IID, Dirichlet(alpha) label skew, label shards.

Written here rather than taken from ``flwr-datasets`` because its partitioners
operate on Hugging Face ``datasets`` objects, while fedapp reads torchvision's
files offline; the functions below work on a plain label array and are
deterministic for a given seed. Every partitioner returns disjoint index arrays
that together cover the data set.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedapp.config import ConfigError, PartitionConfig


def iid_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal parts."""
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_partition_size: int = 10,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Per class, share samples out by proportions drawn from Dir(alpha).

    Smaller ``alpha`` gives more skewed label mixes (Hsu et al. 2019). Draws are
    repeated until every client holds ``min_partition_size`` samples.
    """
    classes = np.unique(labels)
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_partition_size:
            return merged
    raise ConfigError(
        f"Dirichlet partitioning with alpha={alpha} over {num_clients} clients could not give "
        f"every client {min_partition_size} samples in {max_attempts} draws; raise alpha, "
        "lower partition.min_partition_size or use fewer clients"
    )


def shard_partition(
    labels: np.ndarray,
    num_clients: int,
    shards_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """McMahan et al. (2017) pathological non-IID: sort by label, deal out shards.

    The samples sorted by label are cut into ``num_clients * shards_per_client``
    shards and each client receives ``shards_per_client`` random ones, so most
    clients see only that many classes.
    """
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    shard_ids = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in shard_ids]


PartitionFn = Callable[[np.ndarray, PartitionConfig, np.random.Generator], list[np.ndarray]]

PARTITIONERS: dict[str, PartitionFn] = {
    "iid": lambda y, c, rng: iid_partition(y, c.num_clients, rng),
    "dirichlet": lambda y, c, rng: dirichlet_partition(y, c.num_clients, c.alpha, rng, c.min_partition_size),
    "shards": lambda y, c, rng: shard_partition(y, c.num_clients, c.shards_per_client, rng),
}


def check_partition_config(cfg: PartitionConfig, num_samples: int | None = None) -> None:
    """Reject unknown names and impossible sizes before any data is split."""
    if cfg.name not in PARTITIONERS:
        raise ConfigError(f"unknown partition {cfg.name!r}; valid: {sorted(PARTITIONERS)}")
    if num_samples is None:
        return
    needed = cfg.num_clients * (cfg.shards_per_client if cfg.name == "shards" else 1)
    if needed > num_samples:
        raise ConfigError(
            f"partition.num_clients={cfg.num_clients} needs at least {needed} training samples "
            f"for {cfg.name!r} partitioning, but the data set has {num_samples}"
        )


def partition_indices(labels: np.ndarray, cfg: PartitionConfig) -> list[np.ndarray]:
    """All clients' index arrays for ``cfg`` (same seed, same answer, any process)."""
    check_partition_config(cfg, len(labels))
    return PARTITIONERS[cfg.name](labels, cfg, np.random.default_rng(cfg.seed))


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own train/validation split (validation may be empty)."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_val = int(round(len(perm) * val_fraction))
    if n_val >= len(perm):
        n_val = len(perm) - 1
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def label_distribution(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Matrix clients x classes of sample counts (for reports and skew tests)."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
