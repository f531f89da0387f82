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


def test_secaggplus_fedavg_learns_like_plain_fedavg_and_reports_upload_bytes(
    tiny_experiment: ExperimentConfig, tmp_path: Path
) -> None:
    import json

    import numpy as np

    from fedapp.components import new_model
    from fedapp.metrics import read_jsonl
    from fedapp.training import get_weights

    tiny_experiment = replace(tiny_experiment, num_rounds=2)  # two simulations in one test: keep it < 60 s
    plain = run_in_simulation(tiny_experiment)
    secure_cfg = replace(
        tiny_experiment,
        secagg=replace(tiny_experiment.secagg, method="secaggplus"),
        runtime=replace(tiny_experiment.runtime, output_dir=str(tmp_path / "secaggplus")),
    )
    secure_cfg.validate()

    secure = run_in_simulation(secure_cfg)

    assert secure["rounds"] == plain["rounds"]
    assert abs(secure["final_test_accuracy"] - plain["final_test_accuracy"]) <= 0.05
    rows = json.loads((tmp_path / "secaggplus" / "metrics.json").read_text())
    fit_rows = [r for r in rows if r["round"] >= 1]
    assert all(r["fit_clients"] == 3 for r in fit_rows)  # the strategy still sees one result per client
    float32_bytes = sum(a.astype(np.float32).nbytes for a in get_weights(new_model(tiny_experiment)))
    plain_rows = json.loads((Path(tiny_experiment.runtime.output_dir) / "metrics.json").read_text())
    assert plain_rows[1]["upload_update_bytes"] == float32_bytes
    assert fit_rows[0]["upload_update_bytes"] > float32_bytes  # masked integers are wider than float32
    assert fit_rows[0]["upload_total_bytes"] > fit_rows[0]["upload_update_bytes"]  # keys and shares too
    clients = read_jsonl(tmp_path / "secaggplus" / "clients.jsonl")
    assert {c["client"] for c in clients} == {"0", "1", "2"}  # per-client metrics still recorded
