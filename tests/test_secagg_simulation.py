"""Paillier FedAvg end to end in Flower's simulation engine (3 clients, 512-bit key: seconds)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedapp.config import ExperimentConfig
from fedapp.keys import main as keys_main
from fedapp.simulation import run_in_simulation

pytestmark = pytest.mark.slow


def test_paillier_fedavg_learns_like_plain_fedavg(tiny_experiment: ExperimentConfig, tmp_path: Path) -> None:
    assert keys_main(["generate", "--dir", str(tmp_path / "keys"), "--bits", "512"]) == 0
    plain = run_in_simulation(tiny_experiment)
    secure_cfg = replace(
        tiny_experiment,
        secagg=replace(tiny_experiment.secagg, method="paillier", key_dir=str(tmp_path / "keys"), key_bits=512),
        runtime=replace(tiny_experiment.runtime, output_dir=str(tmp_path / "secure")),
    )
    secure_cfg.validate()

    secure = run_in_simulation(secure_cfg)

    assert secure["rounds"] == plain["rounds"]
    assert abs(secure["final_test_accuracy"] - plain["final_test_accuracy"]) <= 0.05
