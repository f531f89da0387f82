"""Partitioners: disjoint, covering, deterministic, and skewed as configured."""

from __future__ import annotations

import numpy as np
import pytest

from fedapp.config import ConfigError, PartitionConfig
from fedapp.partition import (
    dirichlet_partition,
    iid_partition,
    label_distribution,
    partition_indices,
    shard_partition,
    train_val_split,
)

LABELS = np.repeat(np.arange(10), 200)  # 2,000 samples, 200 per class


def assert_disjoint_and_covering(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n, "every sample is assigned"
    assert len(np.unique(merged)) == n, "no sample is assigned twice"


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_covering_and_deterministic(name: str) -> None:
    cfg = PartitionConfig(name=name, num_clients=10, alpha=0.5, seed=7)

    first = partition_indices(LABELS, cfg)
    second = partition_indices(LABELS, cfg)
    other_seed = partition_indices(LABELS, PartitionConfig(name=name, num_clients=10, alpha=0.5, seed=8))

    assert len(first) == 10
    assert_disjoint_and_covering(first, len(LABELS))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))


def test_iid_sizes_differ_by_at_most_one_and_labels_are_balanced() -> None:
    parts = iid_partition(LABELS, 7, np.random.default_rng(0))

    sizes = [len(p) for p in parts]
    counts = label_distribution(LABELS, parts, 10)

    assert max(sizes) - min(sizes) <= 1
    assert counts.min() > 10  # ~28 expected per client and class


def _mean_label_entropy(alpha: float, seeds: range) -> float:
    values = []
    for seed in seeds:
        parts = dirichlet_partition(LABELS, 10, alpha, np.random.default_rng(seed), min_partition_size=1)
        counts = label_distribution(LABELS, parts, 10).astype(float)
        probs = counts / counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
        values.append(entropy.mean())
    return float(np.mean(values))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    entropies = [_mean_label_entropy(alpha, range(5)) for alpha in (100.0, 1.0, 0.1)]

    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.95 * np.log(10)  # near uniform at large alpha
    assert entropies[2] < 0.5 * np.log(10)  # few classes per client at small alpha


def test_dirichlet_respects_min_partition_size() -> None:
    parts = dirichlet_partition(LABELS, 10, 0.3, np.random.default_rng(3), min_partition_size=50)

    assert min(len(p) for p in parts) >= 50


def test_dirichlet_impossible_minimum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_partition_size"):
        dirichlet_partition(LABELS, 10, 0.5, np.random.default_rng(0), min_partition_size=1000, max_attempts=3)


def test_shards_give_each_client_at_most_two_classes_mostly() -> None:
    parts = shard_partition(LABELS, 10, 2, np.random.default_rng(1))

    classes_per_client = (label_distribution(LABELS, parts, 10) > 0).sum(axis=1)

    # 20 shards of 100 samples over 10 classes of 200: each shard is one class
    assert classes_per_client.max() <= 2
    assert all(len(p) == 200 for p in parts)


def test_more_clients_than_samples_is_rejected_before_splitting() -> None:
    with pytest.raises(ConfigError, match="num_clients=50 needs at least 50"):
        partition_indices(np.arange(20) % 10, PartitionConfig(name="iid", num_clients=50))


def test_unknown_partitioner_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"valid: \['dirichlet', 'iid', 'shards'\]"):
        partition_indices(LABELS, PartitionConfig(name="pathological"))


def test_train_val_split_is_a_disjoint_cover_of_the_client_indices() -> None:
    indices = np.arange(100, 200)

    train, val = train_val_split(indices, 0.1, seed=0)

    assert len(val) == 10 and len(train) == 90
    assert set(train) | set(val) == set(indices)
    assert not set(train) & set(val)
