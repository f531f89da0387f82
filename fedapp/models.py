"""CNNs for MNIST and CIFAR-10 that Opacus accepts unchanged, and size estimates.

No BatchNorm (it mixes samples, which breaks per-sample gradients) and no
in-place activations (Opacus's hooks need the inputs), so DP-SGD can wrap any
of these models as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fedapp.config import ConfigError
from fedapp.datasets import DatasetSpec


class MnistCNN(nn.Module):
    """Two 3x3 conv blocks and a 64-unit head (~122k parameters); >=99 % on MNIST."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnistSmallCNN(nn.Module):
    """The ~26k-parameter tanh CNN used for DP-SGD on MNIST (Papernot et al. 2021).

    Few parameters keep DP noise per coordinate and Paillier ciphertexts small.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Cifar10CNN(nn.Module):
    """Three conv stages (32-64-128 channels) with plain ReLU blocks (~0.55M parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ModelEntry:
    """A registered model and the input shape it was designed for."""

    factory: Callable[[int], nn.Module]
    input_shape: tuple[int, int, int]


MODELS: dict[str, ModelEntry] = {
    "cnn_mnist": ModelEntry(MnistCNN, (1, 28, 28)),
    "cnn_mnist_small": ModelEntry(MnistSmallCNN, (1, 28, 28)),
    "cnn_cifar10": ModelEntry(Cifar10CNN, (3, 32, 32)),
}


def check_model(name: str, spec: DatasetSpec) -> None:
    """Unknown names and model/data shape mismatches are configuration errors."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    expected = MODELS[name].input_shape
    if expected != spec.input_shape:
        fitting = sorted(n for n, e in MODELS.items() if e.input_shape == spec.input_shape)
        raise ConfigError(
            f"model {name!r} takes inputs {expected} but dataset {spec.name!r} has {spec.input_shape}; "
            f"models for this dataset: {fitting}"
        )


def build_model(name: str, spec: DatasetSpec) -> nn.Module:
    """A freshly initialised model for ``spec``."""
    check_model(name, spec)
    return MODELS[name].factory(spec.num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what each client uploads per round)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough training-memory budget in bytes (float32)."""

    parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    per_sample_gradients_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.per_sample_gradients_bytes


def estimate_memory(model: nn.Module, batch_size: int, optimizer: str = "sgd", dp: bool = False) -> MemoryEstimate:
    """Weights, gradients, optimizer state and (for DP-SGD) per-sample gradients.

    Activations are not counted; they depend on the input and are small for these
    models next to DP-SGD's ``batch_size x parameters`` per-sample gradients.
    """
    n = count_parameters(model)
    state_copies = {"sgd": 1, "adam": 2}.get(optimizer, 1)  # momentum buffer / Adam moments
    return MemoryEstimate(
        parameters=n,
        weights_bytes=4 * n,
        gradients_bytes=4 * n,
        optimizer_bytes=4 * n * state_copies,
        per_sample_gradients_bytes=4 * n * batch_size if dp else 0,
    )
