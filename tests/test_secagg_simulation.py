"""Paillier FedAvg end to end in Flower's simulation engine (3 clients, 512-bit key: seconds)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedapp.config import ExperimentConfig
from fedapp.keys import main as keys_main
from fedapp.simulation import run_in_simulation

# Heavy: Paillier end to end runs by default under threshold keys (test_dp_fedsgd) and SecAgg+ under
# DP-FedSGD (test_dp_fedsgd_secaggplus); these two (legacy single key with pools, plain SecAgg+) run with -m heavy.
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_paillier_fedavg_learns_like_plain_fedavg_using_the_offline_obfuscator_pools(
    tiny_experiment: ExperimentConfig, tmp_path: Path
) -> None:
    from fedapp.components import new_model
    from fedapp.crypto import load_private_key
    from fedapp.crypto.pool_files import pool_path, precompute_pool, remaining
    from fedapp.crypto.protocol import settings_for
    from fedapp.training import get_weights

    assert keys_main(["generate", "--dir", str(tmp_path / "keys"), "--bits", "512"]) == 0
    plain = run_in_simulation(tiny_experiment)
    secure_cfg = replace(
        tiny_experiment,
        secagg=replace(
            tiny_experiment.secagg, method="paillier", key_dir=str(tmp_path / "keys"), key_bits=512,
            pool_dir=str(tmp_path / "pools"),
        ),
        runtime=replace(tiny_experiment.runtime, output_dir=str(tmp_path / "secure")),
    )
    secure_cfg.validate()
    num_values = sum(a.size for a in get_weights(new_model(secure_cfg)))
    per_round = settings_for(secure_cfg.secagg, secure_cfg.partition.num_clients).layout.num_ciphertexts(num_values)
    private_key = load_private_key(tmp_path / "keys")
    clients = range(secure_cfg.partition.num_clients)
    for i in clients:  # one round more than the run needs, so no background refill muddies the count
        precompute_pool(pool_path(tmp_path / "pools", i), private_key, per_round * (secure_cfg.num_rounds + 1))

    secure = run_in_simulation(secure_cfg)

    assert secure["rounds"] == plain["rounds"]
    assert abs(secure["final_test_accuracy"] - plain["final_test_accuracy"]) <= 0.05
    assert [remaining(pool_path(tmp_path / "pools", i)) for i in clients] == [per_round] * len(clients)


def test_pool_command_precomputes_the_chosen_clients_rounds(tmp_path: Path) -> None:
    from fedapp.crypto.pool_files import remaining

    assert keys_main(["generate", "--dir", str(tmp_path / "keys"), "--bits", "512"]) == 0
    overrides = ["+experiment=smoke", "secagg=paillier", "secagg.key_bits=512"]
    assert keys_main(["pool", "--dir", str(tmp_path / "keys"), "--pool-dir", str(tmp_path / "p"), "--rounds", "1",
                      "--partitions", "1", *overrides]) == 0
    one_round = remaining(tmp_path / "p" / "partition-1.pool")
    assert keys_main(["pool", "--dir", str(tmp_path / "keys"), "--pool-dir", str(tmp_path / "p"), "--rounds", "3",
                      "--partitions", "1", *overrides]) == 0

    assert one_round > 0 and remaining(tmp_path / "p" / "partition-1.pool") == 3 * one_round
    assert [f.name for f in (tmp_path / "p").iterdir()] == ["partition-1.pool"]
    assert keys_main(["pool", "--dir", str(tmp_path / "keys"), "--pool-dir", str(tmp_path / "p"), "--rounds", "1",
                      "+experiment=smoke", "secagg=paillier"]) == 2  # 512-bit key, 2048-bit experiment: refused


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
