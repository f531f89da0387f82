"""The same experiment as real processes: one SuperLink and two SuperNodes on loopback.

Slow (tens of seconds each): every round starts a fresh ClientApp process per node.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fedapp.config import ExperimentConfig
from fedapp.deploy import LaunchError, MARKER_ENV, run_in_processes
from fedapp.metrics import read_jsonl

pytestmark = pytest.mark.slow


def tiny_experiment(output_dir: Path, **runtime: object) -> ExperimentConfig:
    """Two clients on a few hundred synthetic MNIST-shaped images: seconds per round."""
    return ExperimentConfig.from_dict(
        {
            "name": "processes-test",
            "num_rounds": 2,
            "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 200, "synthetic_test_size": 100},
            "partition": {"num_clients": 2},
            "model": {"name": "cnn_mnist"},
            "client": {"batch_size": 32},
            "strategy": {"min_fit_clients": 2, "min_available_clients": 2},
            "runtime": {"mode": "processes", "output_dir": str(output_dir), "timeout_s": 240, **runtime},
        }
    )


def no_process_left() -> list[str]:
    """Processes of any launch still alive (the launcher must stop all of them)."""
    out = subprocess.run(["pgrep", "-af", "flower-super|flwr-serverapp|flwr-clientapp"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    mine = []
    for line in out.stdout.splitlines():
        pid = line.split()[0]
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if MARKER_ENV.encode() in environ and b"<defunct>" not in line.encode():
            mine.append(line)
    return mine


@pytest.mark.heavy  # the TLS run below covers the same processes (one round, both nodes, every log)
def test_two_supernodes_train_two_rounds(tmp_path: Path) -> None:
    # Prepare
    cfg = tiny_experiment(tmp_path / "run")

    # Execute
    summary = run_in_processes(cfg)

    # Assert
    out = tmp_path / "run"
    assert summary["rounds"] == 2
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = json.loads((out / "metrics.json").read_text())
    accuracies = {row["round"]: row.get("test_accuracy") for row in rows}
    assert sorted(accuracies) == [0, 1, 2]
    assert all(isinstance(acc, float) for acc in accuracies.values())
    clients = read_jsonl(out / "clients.jsonl")
    for server_round in (1, 2):
        assert {c["partition_id"] for c in clients if c["round"] == server_round} == {0, 1}, clients
    for name in ("superlink", "supernode-0", "supernode-1", "flwr-run"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert no_process_left() == []


def test_failed_serverapp_raises_with_status(tmp_path: Path) -> None:
    # Prepare: the config is valid, but the ServerApp cannot write its metrics table
    # (a directory sits where metrics.json goes), so it raises inside the run.
    out = tmp_path / "run"
    (out / "metrics.json").mkdir(parents=True)
    cfg = tiny_experiment(out)

    # Execute
    with pytest.raises(LaunchError) as excinfo:
        run_in_processes(cfg)

    # Assert
    assert isinstance(excinfo.value, RuntimeError)
    assert "finished:failed" in str(excinfo.value)
    assert not (out / "summary.json").exists()
    assert no_process_left() == []


@pytest.mark.skipif(os.environ.get("FEDAPP_SKIP_TLS_TEST") == "1", reason="FEDAPP_SKIP_TLS_TEST=1")
def test_tls_and_node_auth_run_completes(tmp_path: Path) -> None:
    # Prepare: one round shows that nodes and CLI reach the SuperLink over TLS and
    # that registered SuperNodes are admitted when node authentication is on
    cfg = tiny_experiment(tmp_path / "run", tls=True)
    cfg.num_rounds = 1

    # Execute
    summary = run_in_processes(cfg, node_auth=True)

    # Assert
    out = tmp_path / "run"
    assert summary["rounds"] == 1
    assert {p.name for p in (out / "certs").iterdir()} >= {"ca.crt", "server.pem", "server.key"}
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://" in superlink_log
    assert "authentication is disabled" not in superlink_log
    assert (out / "logs" / "register.log").read_text().count("registered successfully") == 2
    assert {c["partition_id"] for c in read_jsonl(out / "clients.jsonl") if c["round"] == 1} == {0, 1}
    for name in ("superlink", "supernode-0", "supernode-1", "flwr-run"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert no_process_left() == []


def test_node_auth_requires_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runtime.tls"):
        run_in_processes(tiny_experiment(tmp_path / "run"), node_auth=True)
