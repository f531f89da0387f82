"""Durable runs against faults: a SIGKILLed server, a corrupted checkpoint, a foreign config, a dead database.

The slow tests kill a real ``fedapp run`` process (SIGKILL to its whole process
group: the driver and its Ray workers) in the middle of a round and resume it
with ``fedapp resume``; the fast ones drive :class:`DurableRun` directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedapp.components import new_model
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.metrics import read_jsonl
from fedapp.privacy import PrivacyLedger
from fedapp.store.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from fedapp.store.db import RunStore, StoreError
from fedapp.store.durable import AUDIT_FILE, DurableRun
from fedapp.store.state import strategy_state
from fedapp.strategies import build_strategy
from fedapp.training import get_weights

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **overrides: object) -> ExperimentConfig:
    raw: dict = {
        "name": "durable",
        "num_rounds": 4,
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 600, "synthetic_test_size": 200},
        "partition": {"num_clients": 3},
        "runtime": {"output_dir": str(tmp_path / "run")},
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}", "checkpoint_every": 2},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return ExperimentConfig.from_dict(raw)


def _strategy(cfg: ExperimentConfig, durable: DurableRun):  # type: ignore[no-untyped-def]
    return build_strategy(cfg, initial_parameters=get_weights(new_model(cfg)), evaluate_fn=None, recorder=durable.recorder)


def _rounds(durable: DurableRun, cfg: ExperimentConfig, upto: int, strategy=None) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Drive ``upto`` rounds through the durable boundary with a real strategy (no clients: weights move by hand)."""
    strategy = strategy or _strategy(cfg, durable)
    model = get_weights(new_model(cfg))
    for r in range(durable.start_round, upto + 1):
        model = [w + 0.01 * r for w in model]
        durable.recorder.record(r, fit_clients=3 if r else 0)
        for c in ("0", "1", "2"):
            if r:
                durable.recorder.client(r, c, num_examples=1)
        durable.round_done(r, model, strategy)
    return model


def test_checkpoint_refused_when_altered(tmp_path: Path) -> None:
    """A checkpoint whose bytes changed after its SHA-256 was recorded is never loaded."""
    model = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    state = {"velocity": [np.ones(3)], "ledger": {"history": [[1.1, 0.2, 3]]}}
    written = write_checkpoint(tmp_path / "c.npz", server_round=7, model=model, state=state, meta={"run_id": "r"})
    back = read_checkpoint(written.path, expected_sha256=written.sha256)
    assert back.round == 7 and np.array_equal(back.model[0], model[0]) and back.model[0].dtype == np.float32
    assert np.array_equal(back.state["velocity"][0], np.ones(3)) and back.state["ledger"] == state["ledger"]
    raw = bytearray(written.path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    written.path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        read_checkpoint(written.path, expected_sha256=written.sha256)


def test_resume_restores_state_and_refuses_corruption_and_foreign_config(tmp_path: Path) -> None:
    from fedapp.exclusion import Exclusion
    from fedapp.robustness import AnomalyQuarantine
    from fedapp.store.state import strategy_chain

    overrides = {"defense.name": "detect", "strategy.min_fit_clients": 2}
    cfg = _cfg(tmp_path, **overrides)
    durable, _ = DurableRun.open(cfg)
    strategy = _strategy(cfg, durable)
    quarantine = next(m for m in strategy_chain(strategy) if isinstance(m, AnomalyQuarantine))
    quarantine.reputation = {"1": 0.3, "2": 0.9}
    quarantine.quarantined = {"1": ("node-a", 1)}
    quarantine.excluded.add(Exclusion("node-a", "1", 1, "quarantined", "reputation 0.300 < 0.4"))
    _rounds(durable, cfg, upto=3, strategy=strategy)  # checkpoints after rounds 0 and 2; round 3 committed without one
    saved = strategy_state(strategy)
    run_id = durable.run.run_id
    durable.store.close()  # the "crash": no finish()

    resumed_cfg = _cfg(tmp_path, **overrides, **{"store.resume": run_id})
    resumed, recorder = DurableRun.open(resumed_cfg)
    assert resumed.start_round == 2 and resumed.attempt == 2
    fresh = build_strategy(resumed_cfg, initial_parameters=get_weights(new_model(cfg)), evaluate_fn=None, recorder=recorder)
    model = resumed.restore(fresh)
    assert model is not None and np.allclose(model[0], get_weights(new_model(cfg))[0] + 0.01 * (0 + 1 + 2))
    assert json.dumps(strategy_state(fresh), sort_keys=True, default=str) == json.dumps(saved, sort_keys=True, default=str)
    assert "node-a" in next(m for m in strategy_chain(fresh) if isinstance(m, AnomalyQuarantine)).excluded
    assert sorted(recorder.rows) == [0, 1, 2]  # the rows of the rounds the checkpoint covers, not round 3's
    resumed.store.close()

    store = RunStore(resumed_cfg.store.url)
    ckpt = store.latest_checkpoint(run_id)
    assert ckpt is not None and ckpt.round == 2
    with pytest.raises(ConfigError, match="was started with config"):
        DurableRun.open(_cfg(tmp_path, **overrides, **{"store.resume": run_id, "client.lr": 0.5}))
    Path(ckpt.path).write_bytes(Path(ckpt.path).read_bytes()[:-10])  # damaged on disk
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        DurableRun.open(resumed_cfg)
    store.close()


def test_resume_refuses_a_tampered_audit_log(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    durable, _ = DurableRun.open(cfg)
    _rounds(durable, cfg, upto=2)
    audit = Path(durable.run.output_dir) / AUDIT_FILE
    durable.store.close()
    lines = audit.read_text().splitlines()
    del lines[2]  # the adversary removes an entry before the run is resumed
    audit.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="audit log"):
        DurableRun.open(_cfg(tmp_path, **{"store.resume": durable.run.run_id}))


def test_unreachable_store_fails_the_run_before_training(tmp_path: Path) -> None:
    """No record, no training: a dead database is retried, then the run stops with the URL in one line."""
    cfg = _cfg(tmp_path, **{"store.url": "postgresql+psycopg://fedapp@127.0.0.1:1/none", "store.retries": 1})
    with pytest.raises(StoreError, match="127.0.0.1:1"):
        DurableRun.open(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_run_that_trained_nothing_is_failed(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_rounds=2)
    durable, _ = DurableRun.open(cfg)
    strategy = _strategy(cfg, durable)
    model = get_weights(new_model(cfg))
    for r in range(0, 3):
        durable.recorder.record(r, fit_clients=0)  # every sampled client failed or declined
        durable.round_done(r, model, strategy)
    durable.finish("completed")
    assert durable.status == "failed" and "trained nothing" in (durable.error or "")
    store = RunStore(cfg.store.url)
    assert store.get_run(durable.run.run_id).status == "failed"
    store.close()


# ------------------------------------------------------------------ SIGKILL a real process

def _fedapp(*args: str, env: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "fedapp.cli", *args]


def _overrides(tmp_path: Path, name: str, extra: list[str]) -> list[str]:
    return [
        "+experiment=smoke", f"name={name}", "num_rounds=4", "dataset.synthetic_train_size=600",
        "dataset.synthetic_test_size=200", f"hydra.run.dir={tmp_path / name}", f"store.url=sqlite:///{tmp_path / 'store.db'}",
        f"store.run_id={name}", "store.checkpoint_every=2", *extra,
    ]


def _final_model_digest(run_dir: Path) -> str:
    aggregations = [e for e in read_jsonl(run_dir / AUDIT_FILE) if e["kind"] == "aggregation"]
    return aggregations[-1]["fields"]["model_sha256"]


def _kill_after_round_trained(cmd: list[str], run_dir: Path, server_round: int, env: dict[str, str]) -> None:
    """Start ``cmd`` and SIGKILL its process group once clients have trained ``server_round`` (before the next checkpoint)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(line["round"] == server_round for line in read_jsonl(run_dir / "clients.jsonl")):
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(line["round"] == server_round for line in read_jsonl(run_dir / "clients.jsonl")), "never reached the round"


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    """Killed after round 3 trained (checkpoint at 2), resumed: the final model is bit-for-bit the uninterrupted one."""
    env = dict(os.environ)
    subprocess.run(_fedapp("run", *_overrides(tmp_path, "straight", []), env=env), cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    _kill_after_round_trained(_fedapp("run", *_overrides(tmp_path, "killed", []), env=env), tmp_path / "killed", 3, env)
    store = RunStore(f"sqlite:///{tmp_path / 'store.db'}")
    assert store.get_run("killed").status == "running"  # SIGKILL leaves no chance to record anything else
    store.close()
    done = subprocess.run(_fedapp("resume", "killed", "--store", f"sqlite:///{tmp_path / 'store.db'}", env=env),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _final_model_digest(tmp_path / "killed") == _final_model_digest(tmp_path / "straight")
    verified = subprocess.run(_fedapp("audit", "verify", "killed", "--store", f"sqlite:///{tmp_path / 'store.db'}", env=env),
                              cwd=ROOT, env=env, capture_output=True, text=True)
    assert verified.returncode == 0 and "OK" in verified.stdout
    store = RunStore(f"sqlite:///{tmp_path / 'store.db'}")
    run = store.get_run("killed")
    assert run.status == "completed" and run.attempt == 2 and run.last_round == 4
    assert [r.attempt for r in store.rounds("killed", effective_only=True) if r.round >= 3] == [2, 2]
    store.close()


@pytest.mark.slow
def test_privacy_spend_of_an_interrupted_round_stays_spent(tmp_path: Path) -> None:
    """DP-SGD clients keep their ledgers on disk: every round they trained is counted, including the lost one."""
    env = dict(os.environ)
    ledgers = tmp_path / "ledgers"
    extra = ["privacy=dpsgd", "privacy.client.noise_multiplier=1.0", "privacy.client.target_epsilon=0",
             "privacy.client.sample_rate=0.1", f"privacy.client.ledger_dir={ledgers}"]
    run_dir = tmp_path / "dp"
    _kill_after_round_trained(_fedapp("run", *_overrides(tmp_path, "dp", extra), env=env), run_dir, 3, env)
    done = subprocess.run(_fedapp("resume", "dp", "--store", f"sqlite:///{tmp_path / 'store.db'}", env=env),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    trained = read_jsonl(run_dir / "clients.jsonl")  # one line per client per round trained, across both attempts
    for client in ("0", "1", "2"):
        rounds = [line["round"] for line in trained if line["client"] == client]
        assert sorted(set(rounds)) == [1, 2, 3, 4] and rounds.count(3) == 2  # round 3 trained twice
        ledger = PrivacyLedger.load(ledgers / f"partition-{client}.json")
        per_round = ledger.steps // len(rounds)
        assert ledger.steps == per_round * 5  # 4 rounds + the interrupted one: never under-counted
        final = [line["epsilon"] for line in trained if line["client"] == client][-1]
        assert final == pytest.approx(ledger.epsilon(1e-5), rel=1e-6)
        uninterrupted = PrivacyLedger("rdp")
        uninterrupted.record(noise_multiplier=1.0, sample_rate=0.1, steps=per_round * 4)
        assert final > uninterrupted.epsilon(1e-5)
    events = [e for e in read_jsonl(run_dir / AUDIT_FILE) if e["kind"] == "resume"]
    assert events and 3 in events[0]["fields"]["interrupted_rounds"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempt"] == 2
