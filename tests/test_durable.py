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
from fedapp.store.durable import AUDIT_FILE, DurableRun, release_run_lock
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


def _crash(durable: DurableRun) -> None:
    """What the process's death does: the database connection and the run lock go (nothing else is written)."""
    durable.store.close()
    release_run_lock(durable._lock)


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
    _crash(durable)  # no finish()

    resumed_cfg = _cfg(tmp_path, **overrides, **{"store.resume": run_id})
    resumed, recorder = DurableRun.open(resumed_cfg)
    assert resumed.start_round == 2 and resumed.attempt == 2
    fresh = build_strategy(resumed_cfg, initial_parameters=get_weights(new_model(cfg)), evaluate_fn=None, recorder=recorder)
    model = resumed.restore(fresh)
    assert model is not None and np.allclose(model[0], get_weights(new_model(cfg))[0] + 0.01 * (0 + 1 + 2))
    assert json.dumps(strategy_state(fresh), sort_keys=True, default=str) == json.dumps(saved, sort_keys=True, default=str)
    assert "node-a" in next(m for m in strategy_chain(fresh) if isinstance(m, AnomalyQuarantine)).excluded
    assert sorted(recorder.rows) == [0, 1, 2]  # the rows of the rounds the checkpoint covers, not round 3's
    _crash(resumed)

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
    _crash(durable)
    lines = audit.read_text().splitlines()
    del lines[2]  # the adversary removes an entry before the run is resumed
    audit.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="audit log"):
        DurableRun.open(_cfg(tmp_path, **{"store.resume": durable.run.run_id}))


def test_a_live_run_cannot_be_resumed_under_it(tmp_path: Path) -> None:
    """Two writers would interleave audit entries: the second is refused while the first holds the run."""
    cfg = _cfg(tmp_path)
    durable, _ = DurableRun.open(cfg)
    _rounds(durable, cfg, upto=2)
    with pytest.raises(ConfigError, match="being written by another live process"):
        DurableRun.open(_cfg(tmp_path, **{"store.resume": durable.run.run_id}))
    _crash(durable)
    resumed, _ = DurableRun.open(_cfg(tmp_path, **{"store.resume": durable.run.run_id}))
    assert resumed.start_round == 2
    _crash(resumed)


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
            # every client's line of the round: killing between two of them would leave a client
            # whose trained round the record never saw (the ledger on disk still counts it)
            if {line["client"] for line in read_jsonl(run_dir / "clients.jsonl") if line["round"] == server_round} >= {
                "0", "1", "2"
            }:
                break
            time.sleep(0.02)
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


# ------------------------------------------------------------------ an insider with the output folder and the store

def _signed_run(tmp_path: Path, upto: int = 3, **overrides: object):  # type: ignore[no-untyped-def]
    from fedapp.store.audit import generate_audit_key

    private, public = generate_audit_key(tmp_path / "keys")
    cfg = _cfg(tmp_path, **{"store.audit_key": str(private)}, **overrides)
    durable, _ = DurableRun.open(cfg)
    _rounds(durable, cfg, upto=upto)
    _crash(durable)
    return cfg, durable.run.run_id, private


def test_resume_will_not_sign_a_chain_the_insider_rewrote(tmp_path: Path) -> None:
    """The insider drops the entries of round 1, re-hashes the rest, fixes the store's head and deletes the head file."""
    from fedapp.store.audit import entry_hash, head_path

    cfg, run_id, _ = _signed_run(tmp_path)
    audit = tmp_path / "run" / AUDIT_FILE
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kept = [e for e in entries if e["round"] != 1]
    prev = "0" * 64
    for seq, e in enumerate(kept, start=1):
        e["seq"], e["prev"] = seq, prev
        e["hash"] = prev = entry_hash({k: v for k, v in e.items() if k != "hash"})
    audit.write_text("".join(json.dumps(e) + "\n" for e in kept))
    head_path(audit).unlink()
    import sqlalchemy as sa

    engine = sa.create_engine(cfg.store.url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET audit_seq=:s, audit_head=:h WHERE run_id=:r"),
                     {"s": len(kept), "h": prev, "r": run_id})
    engine.dispose()
    with pytest.raises(CheckpointError, match="does not verify"):
        DurableRun.open(_cfg(tmp_path, **{"store.audit_key": cfg.store.audit_key, "store.resume": run_id}))
    with pytest.raises(CheckpointError, match="signed with audit key"):  # and without the key it is not resumed either
        DurableRun.open(_cfg(tmp_path, **{"store.resume": run_id}))


def test_resume_refuses_a_forged_checkpoint_even_with_its_hash_in_the_store(tmp_path: Path) -> None:
    """The insider writes a checkpoint with an emptied accountant and puts its SHA-256 into the store."""
    from fedapp.store.checkpoint import read_checkpoint as read, write_checkpoint as write

    cfg, run_id, _ = _signed_run(tmp_path)
    store = RunStore(cfg.store.url)
    record = store.latest_checkpoint(run_id)
    store.close()
    assert record is not None
    real = read(record.path, expected_sha256=record.sha256)
    forged = write(record.path, server_round=real.round, model=[m * 0 for m in real.model], state=real.state, meta=real.meta)
    import sqlalchemy as sa

    engine = sa.create_engine(cfg.store.url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE checkpoints SET sha256=:h WHERE run_id=:r AND round=:n"),
                     {"h": forged.sha256, "r": run_id, "n": record.round})
    engine.dispose()
    with pytest.raises(CheckpointError, match="not one the audit chain recorded"):
        DurableRun.open(_cfg(tmp_path, **{"store.audit_key": cfg.store.audit_key, "store.resume": run_id}))


def test_server_releases_after_the_checkpoint_are_booked_again(tmp_path: Path) -> None:
    """Central DP: rounds 3 and 4 were released before the crash but after the checkpoint of round 2."""
    from fedapp.dp_strategy import CentralDPAccounting
    from fedapp.store.state import strategy_chain

    overrides = {"privacy.central.enabled": True, "privacy.central.noise_multiplier": 1.2, "strategy.fraction_fit": 1.0}
    cfg = _cfg(tmp_path, **overrides)
    durable, recorder = DurableRun.open(cfg)
    strategy = _strategy(cfg, durable)
    ledger = next(m for m in strategy_chain(strategy) if isinstance(m, CentralDPAccounting)).ledger
    model = get_weights(new_model(cfg))
    for r in range(0, 5):
        if r:
            eps = ledger.spend(1.2)
            recorder.record(r, fit_clients=3, central_epsilon=eps, central_noise_multiplier=1.2)
            recorder.client(r, "0", num_examples=1)
            durable.released(r)
        if r <= 2:
            durable.round_done(r, model, strategy)
    steps_at_crash = ledger.ledger.steps
    _crash(durable)  # rounds 3 and 4 were released (logged) but never committed
    resumed, rec = DurableRun.open(_cfg(tmp_path, **overrides, **{"store.resume": durable.run.run_id}))
    fresh = _strategy(_cfg(tmp_path, **overrides), resumed)
    resumed.restore(fresh)
    booked = next(m for m in strategy_chain(fresh) if isinstance(m, CentralDPAccounting)).ledger
    assert resumed.start_round == 2 and steps_at_crash == 4
    assert booked.ledger.steps == 4  # 2 from the checkpoint + the 2 releases logged after it: never under-counted
    _crash(resumed)


def test_client_metrics_cannot_forge_records_or_crash_the_round(tmp_path: Path) -> None:
    """A client reports metrics named like the recorder's own fields, and non-numbers where numbers belong."""
    cfg = _cfg(tmp_path)
    durable, recorder = DurableRun.open(cfg)
    strategy = _strategy(cfg, durable)
    recorder.record(0)
    durable.round_done(0, get_weights(new_model(cfg)), strategy)
    recorder.record(1, fit_clients=2)
    recorder.client(1, "0", num_examples=1, line="event", kind="client_released", reason="forged", epsilon="x")
    recorder.client(1, "1", num_examples=1, declined="yes")
    durable.round_done(1, get_weights(new_model(cfg)), strategy)
    store = RunStore(cfg.store.url)
    updates = {u.client: u for u in store.updates(durable.run.run_id)}
    assert updates["0"].status == "accepted" and updates["0"].epsilon is None
    assert set(updates) == {"0", "1"}
    store.close()
    kinds = [e["kind"] for e in read_jsonl(tmp_path / "run" / AUDIT_FILE)]
    assert "client_released" not in kinds
    _crash(durable)


def test_client_dp_resume_needs_the_clients_ledgers(tmp_path: Path) -> None:
    overrides = {"privacy.client.enabled": True, "privacy.client.noise_multiplier": 1.0, "privacy.client.sample_rate": 0.1}
    cfg = _cfg(tmp_path, **overrides)
    durable, _ = DurableRun.open(cfg)
    _rounds(durable, cfg, upto=2)
    _crash(durable)
    with pytest.raises(ConfigError, match="ledger_dir"):
        DurableRun.open(_cfg(tmp_path, **overrides, **{"store.resume": durable.run.run_id}))


def test_a_torn_last_line_is_set_aside_not_lost(tmp_path: Path) -> None:
    """A crash in the middle of an append leaves half a line past the recorded head: kept aside, noted, resumed."""
    cfg = _cfg(tmp_path)
    durable, _ = DurableRun.open(cfg)
    _rounds(durable, cfg, upto=2)
    _crash(durable)
    audit = tmp_path / "run" / AUDIT_FILE
    with audit.open("a") as fh:
        fh.write('{"seq": 99, "kind": "aggreg')
    resumed, _ = DurableRun.open(_cfg(tmp_path, **{"store.resume": durable.run.run_id}))
    notes = [e for e in read_jsonl(audit) if e["kind"] == "note"]
    assert notes and notes[0]["fields"]["torn_tail"]["bytes"] == len('{"seq": 99, "kind": "aggreg')
    assert list((tmp_path / "run").glob("audit.jsonl.torn-*"))
    _crash(resumed)


def test_operator_stop_checkpoints_records_the_admin_action_and_resumes(tmp_path: Path) -> None:
    """`fedapp runs stop` between checkpoints: the round in progress ends with a checkpoint, status interrupted."""
    from typer.testing import CliRunner

    from fedapp.cli import app

    cfg = _cfg(tmp_path, **{"store.checkpoint_every": 10})
    durable, recorder = DurableRun.open(cfg)
    strategy = _strategy(cfg, durable)
    model = get_weights(new_model(cfg))
    for r in range(0, 2):
        recorder.record(r, fit_clients=3 if r else 0)
        durable.round_done(r, model, strategy)
    asked = CliRunner().invoke(app, ["runs", "stop", durable.run.run_id, "--store", cfg.store.url, "--reason", "maintenance"])
    assert asked.exit_code == 0, asked.stderr
    recorder.record(2, fit_clients=3)
    recorder.client(2, "0", num_examples=1)
    durable.round_done(2, model, strategy)
    assert durable.stopping and durable.stopping["reason"] == "maintenance"
    durable.stop()
    store = RunStore(cfg.store.url)
    run = store.get_run(durable.run.run_id)
    assert run.status == "interrupted" and "maintenance" in (run.error or "")
    assert store.latest_checkpoint(run.run_id).round == 2  # taken for the stop, although checkpoint_every=10
    store.close()
    actions = [e for e in read_jsonl(tmp_path / "run" / AUDIT_FILE) if e["kind"] == "admin_action"]
    assert actions and actions[0]["fields"]["action"] == "stop" and actions[0]["fields"]["reason"] == "maintenance"
    again = CliRunner().invoke(app, ["runs", "stop", durable.run.run_id, "--store", cfg.store.url])
    assert again.exit_code == 2 and "not running" in again.stderr
    resumed, _ = DurableRun.open(_cfg(tmp_path, **{"store.checkpoint_every": 10, "store.resume": durable.run.run_id}))
    assert resumed.start_round == 2 and not (tmp_path / "run" / "STOP").exists()
    _crash(resumed)
