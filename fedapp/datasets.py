"""Data sets as in-memory tensors, loaded through torchvision (no Flower here).

Images are decoded once into normalised float tensors: per-sample PIL transforms
would dominate a round's time on two cores, and Opacus's Poisson sampler works
on any map-style data set.

Where the files come from: ``dataset.root`` if set, else ``$FEDAPP_DATA_ROOT``,
else ``./data``. torchvision downloads into that folder when ``dataset.download``
is on and the network allows; otherwise :class:`DataUnavailableError` names the
folder and the files that were expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedapp.config import ConfigError, DatasetConfig

DATA_ROOT_ENV = "FEDAPP_DATA_ROOT"


class DataUnavailableError(FileNotFoundError):
    """Neither the data files nor a working download were available."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a data set."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    expected_files: tuple[str, ...] = ()


MNIST_SPEC = DatasetSpec(
    "mnist",
    (1, 28, 28),
    10,
    (0.1307,),
    (0.3081,),
    (
        "MNIST/raw/train-images-idx3-ubyte",
        "MNIST/raw/train-labels-idx1-ubyte",
        "MNIST/raw/t10k-images-idx3-ubyte",
        "MNIST/raw/t10k-labels-idx1-ubyte",
    ),
)
CIFAR10_SPEC = DatasetSpec(
    "cifar10",
    (3, 32, 32),
    10,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    ("cifar-10-batches-py/data_batch_1..5", "cifar-10-batches-py/test_batch"),
)

SPECS: dict[str, DatasetSpec] = {
    "mnist": MNIST_SPEC,
    "cifar10": CIFAR10_SPEC,
    "synthetic_mnist": DatasetSpec("synthetic_mnist", (1, 28, 28), 10, (0.0,), (1.0,)),
    "synthetic_cifar10": DatasetSpec("synthetic_cifar10", (3, 32, 32), 10, (0.0,) * 3, (1.0,) * 3),
}


def canonical_name(name: str) -> str:
    """``synthetic-mnist`` and ``synthetic_mnist`` are one data set: the underscore (the Hydra option's) is canonical."""
    return name.replace("-", "_")


def dataset_spec(name: str) -> DatasetSpec:
    """Look a data set up by name (either spelling, :func:`canonical_name`); unknown names list the valid ones."""
    try:
        return SPECS[canonical_name(name)]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; valid: {sorted(SPECS)}") from None


def resolve_root(root: str) -> Path:
    """The folder data is read from (config, then environment, then ./data)."""
    return Path(root or os.environ.get(DATA_ROOT_ENV) or "data").expanduser().resolve()


def load_dataset(cfg: DatasetConfig) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets for ``cfg`` as ``TensorDataset(x float32 NCHW, y int64)``.

    Cached per process: simulation actors and the server load each set once.
    """
    return _load_cached(
        cfg.name,
        str(resolve_root(cfg.root)),
        cfg.download,
        cfg.max_train_samples,
        cfg.max_test_samples,
        cfg.synthetic_train_size,
        cfg.synthetic_test_size,
    )


@lru_cache(maxsize=4)
def _load_cached(
    name: str,
    root: str,
    download: bool,
    max_train: int,
    max_test: int,
    synth_train: int,
    synth_test: int,
) -> tuple[TensorDataset, TensorDataset]:
    spec = dataset_spec(name)
    if canonical_name(name).startswith("synthetic_"):
        train, test = synthetic_dataset(spec, synth_train, synth_test, seed=1234)
    else:
        train, test = _TORCHVISION_LOADERS[name](Path(root), download, spec)
    return _subset(train, max_train, seed=0), _subset(test, max_test, seed=1)


def synthetic_dataset(
    spec: DatasetSpec, train_size: int, test_size: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Learnable stand-in data: one random prototype image per class plus noise.

    Used where real files are absent (CIFAR-10 here) and in tests.
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn((spec.num_classes, *spec.input_shape), generator=gen)

    def draw(n: int) -> TensorDataset:
        y = torch.randint(0, spec.num_classes, (n,), generator=gen)
        noise = torch.randn((n, *spec.input_shape), generator=gen)
        x = (prototypes[y] + 1.5 * noise) / 3.25**0.5  # unit variance, like standardised images
        return TensorDataset(x.float(), y.long())

    return draw(train_size), draw(test_size)


def _normalise(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 NCHW -> float32 standardised per channel."""
    x = images.float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


def _load_mnist(root: Path, download: bool, spec: DatasetSpec) -> tuple[TensorDataset, TensorDataset]:
    from torchvision.datasets import MNIST

    def split(train: bool) -> TensorDataset:
        ds = _open_torchvision(MNIST, root, train, download, spec)
        return TensorDataset(_normalise(ds.data.unsqueeze(1), spec), ds.targets.long())

    return split(True), split(False)


def _load_cifar10(root: Path, download: bool, spec: DatasetSpec) -> tuple[TensorDataset, TensorDataset]:
    from torchvision.datasets import CIFAR10

    def split(train: bool) -> TensorDataset:
        ds = _open_torchvision(CIFAR10, root, train, download, spec)
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2)
        return TensorDataset(_normalise(images, spec), torch.tensor(ds.targets, dtype=torch.long))

    return split(True), split(False)


_TORCHVISION_LOADERS: dict[str, Callable[[Path, bool, DatasetSpec], tuple[TensorDataset, TensorDataset]]] = {
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
}


def _open_torchvision(cls: type, root: Path, train: bool, download: bool, spec: DatasetSpec):  # noqa: ANN202
    """Open from disk; download only when the files are missing and allowed."""
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        reason = "not found on disk"
    if download:
        try:
            return cls(str(root), train=train, download=True)
        except Exception as err:  # noqa: BLE001 - any network/IO failure means the same to the user
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            reason = f"not on disk and the download failed ({type(err).__name__}: {first_line})"
    else:
        reason += "; dataset.download is off"
    expected = ", ".join(spec.expected_files)
    raise DataUnavailableError(
        f"{spec.name} is unavailable under data root {root}: {reason}. "
        f"Expected files: {expected}. Point dataset.root (or ${DATA_ROOT_ENV}) at the folder "
        "that holds them, or run online with dataset.download=true."
    )


def _subset(ds: TensorDataset, limit: int, seed: int) -> TensorDataset:
    n = len(ds)
    if limit <= 0 or limit >= n:
        return ds
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:limit])
    return TensorDataset(*(t[idx] for t in ds.tensors))


def labels_of(ds: TensorDataset) -> np.ndarray:
    """Integer labels as numpy, for the partitioners."""
    return ds.tensors[1].numpy()
