"""Models: shapes, parameter counts worked out by hand, Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedapp.config import ConfigError
from fedapp.datasets import dataset_spec
from fedapp.models import build_model, count_parameters, estimate_memory

# conv weights + biases, then linear weights + biases, layer by layer
EXPECTED_PARAMS = {
    "cnn_mnist": (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (1600 * 64 + 64) + (64 * 10 + 10),
    "cnn_mnist_small": (1 * 16 * 64 + 16) + (16 * 32 * 16 + 32) + (512 * 32 + 32) + (32 * 10 + 10),
    "cnn_cifar10": (3 * 32 * 9 + 32)
    + (32 * 32 * 9 + 32)
    + (32 * 64 * 9 + 64)
    + (64 * 64 * 9 + 64)
    + (64 * 128 * 9 + 128)
    + (128 * 128 * 9 + 128)
    + (2048 * 128 + 128)
    + (128 * 10 + 10),
}
DATASET_OF = {"cnn_mnist": "mnist", "cnn_mnist_small": "mnist", "cnn_cifar10": "cifar10"}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_model_output_shape_and_parameter_count(name: str) -> None:
    spec = dataset_spec(DATASET_OF[name])
    model = build_model(name, spec)

    logits = model(torch.zeros(4, *spec.input_shape))

    assert logits.shape == (4, 10)
    assert count_parameters(model) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_models_are_accepted_by_opacus_unchanged(name: str) -> None:
    model = build_model(name, dataset_spec(DATASET_OF[name]))

    assert ModuleValidator.validate(model, strict=False) == []


def test_memory_estimate_counts_per_sample_gradients_for_dp() -> None:
    model = build_model("cnn_mnist_small", dataset_spec("mnist"))
    n = EXPECTED_PARAMS["cnn_mnist_small"]

    plain = estimate_memory(model, batch_size=64, optimizer="sgd")
    private = estimate_memory(model, batch_size=64, optimizer="sgd", dp=True)

    assert plain.total_bytes == 4 * n * 3  # weights + grads + momentum
    assert private.per_sample_gradients_bytes == 4 * n * 64
    assert private.total_bytes == plain.total_bytes + 4 * n * 64


def test_model_dataset_mismatch_names_fitting_models() -> None:
    with pytest.raises(ConfigError, match=r"models for this dataset: \['cnn_cifar10'\]"):
        build_model("cnn_mnist", dataset_spec("cifar10"))


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="valid: \\['cnn_cifar10', 'cnn_mnist', 'cnn_mnist_small'\\]"):
        build_model("resnet18", dataset_spec("mnist"))
