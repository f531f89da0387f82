"""Shared fixtures: the data root and small experiments on synthetic data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fedapp.config import ExperimentConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "FEDAPP_DATA_ROOT" not in os.environ and SHARED_DATA.exists():
    os.environ["FEDAPP_DATA_ROOT"] = str(SHARED_DATA)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Every run is recorded in a run store; the tests' runs go to a throw-away one, never to ./outputs.
if "FEDAPP_STORE_URL" not in os.environ:
    os.environ["FEDAPP_STORE_URL"] = f"sqlite:///{tempfile.mkdtemp(prefix='fedapp-test-store-')}/fedapp.db"


def mnist_available() -> bool:
    root = Path(os.environ.get("FEDAPP_DATA_ROOT", "data"))
    return (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


needs_mnist = pytest.mark.skipif(not mnist_available(), reason="MNIST files not under $FEDAPP_DATA_ROOT")


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> ExperimentConfig:
    """Three clients on 1,200 synthetic MNIST-shaped samples."""
    return ExperimentConfig.from_dict(
        {
            "name": "tiny",
            "num_rounds": 3,
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 1200, "synthetic_test_size": 300},
            "partition": {"num_clients": 3},
            "runtime": {"output_dir": str(tmp_path / "run")},
        }
    )
