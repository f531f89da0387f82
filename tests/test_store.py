"""The run store, on an SQLite file and on a real PostgreSQL server (tests/postgres.py).

Every database test runs on both backends: what a run records must read back
the same wherever it is stored, and the failure modes (locks, a server that is
down, an old schema) differ in their details but not in what the caller sees.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from fedapp.store import (
    CheckpointRecord,
    ClientUpdateRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    RunStore,
    StoreError,
    UnknownRunError,
    code_version,
    config_hash,
    effective_rounds,
)
from fedapp.store import records as records_module
from fedapp.store.db import METADATA, alembic_config, create_store_engine
from tests.postgres import PostgresUnavailable, running_postgres

FAST = {"retries": 1, "retry_wait_s": 0.01, "timeout_s": 1.0}


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    try:
        with running_postgres() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL: {exc}")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server (creating one takes ~0.1 s)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'not-yet' / 'runs.db'}"  # the store creates the folder
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[RunStore]:
    with RunStore(store_url, **FAST) as opened:
        yield opened


# -- helpers --------------------------------------------------------------------


def make_run(run_id: str = "run-1", started_at: float = 1000.0) -> RunRecord:
    config = {"num_rounds": 3, "strategy": {"name": "fedavg"}}
    return RunRecord(
        run_id=run_id, name="tiny", config=config, config_hash=config_hash(config), code_version="v-test",
        status="running", started_at=started_at, output_dir=f"/out/{run_id}",
    )


RoundParts = tuple[RoundRecord, list[ClientUpdateRecord], list[EventRecord], CheckpointRecord]


def make_round(rnd: int, attempt: int = 1, run_id: str = "run-1") -> RoundParts:
    start = 1000.0 + 10 * rnd + attempt / 8
    round_ = RoundRecord(
        run_id, rnd, attempt, {"accuracy": 0.5 + rnd / 100, "loss": 1.25 / rnd}, start, start + 2.5,
        ["c0", "c1", "c2"], bytes_up=3 * 2**33, bytes_down=rnd,  # more than 32 bits: BIGINT columns
    )
    updates = [
        ClientUpdateRecord(run_id, rnd, attempt, "c0", "accepted", num_examples=40, update_norm=1.5, epsilon=0.25),
        ClientUpdateRecord(run_id, rnd, attempt, "c1", "quarantined", reason="norm 9.0 > 3.0", anomaly_score=4.5),
        ClientUpdateRecord(run_id, rnd, attempt, "c2", "declined", reason="budget spent"),
    ]
    events = [EventRecord(run_id, rnd, "exclusion", "anomalous update", {"client": "c1", "score": 4.5}, start + 1)]
    checkpoint = CheckpointRecord(
        run_id, rnd, f"/out/{run_id}/ckpt-{rnd}.npz", f"{rnd:064x}", 12345, 0.125, f"head-{rnd}", 10 * rnd, start + 2
    )
    return round_, updates, events, checkpoint


def commit(store: RunStore, rnd: int, attempt: int = 1, *, checkpoint: bool = True) -> RoundParts:
    round_, updates, events, ckpt = make_round(rnd, attempt)
    store.commit_round("run-1", round_, updates, events, ckpt if checkpoint else None,
                       audit_head=f"head-{rnd}", audit_seq=10 * rnd)
    return round_, updates, events, ckpt


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


# -- records --------------------------------------------------------------------


def test_records_refuse_unknown_statuses() -> None:
    with pytest.raises(ValueError, match="RunRecord.status must be one of running, completed"):
        RunRecord("r", "n", {}, "h", "v", "paused", 0.0, "/o")
    with pytest.raises(ValueError, match="ClientUpdateRecord.status .* not 'ignored'"):
        ClientUpdateRecord("r", 1, 1, "c", "ignored")
    assert RoundRecord("r", 1, 1, {}, 10.0, 12.5, []).duration_s == 2.5


def test_config_hash_is_sha256_of_canonical_json() -> None:
    expected = hashlib.sha256(b'{"a":[1,2],"b":{"c":null,"d":0.5}}').hexdigest()
    assert config_hash({"b": {"d": 0.5, "c": None}, "a": [1, 2]}) == expected
    assert config_hash({"a": [1, 2], "b": {"c": None, "d": 0.5}}) == expected


def test_code_version_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    assert code_version()

    def no_git(*_args: Any, **_kwargs: Any) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(records_module.subprocess, "run", no_git)
    assert code_version() == "0.1.0"  # the installed package's version


def test_effective_rounds_follow_the_resumed_lineage() -> None:
    # Attempt 1 reached round 4; attempt 2 resumed from the checkpoint of round 2 and did round 3;
    # attempt 3 resumed from round 3 and has committed nothing yet.
    rounds = [RoundRecord("r", n, 1, {}, 0.0, 1.0, []) for n in (1, 2, 3, 4)]
    rounds.append(RoundRecord("r", 3, 2, {}, 0.0, 1.0, []))
    kept = effective_rounds(rounds)
    assert [(r.round, r.attempt) for r in kept] == [(1, 1), (2, 1), (3, 2)]  # round 4 of attempt 1 is abandoned
    assert effective_rounds([]) == []


# -- the store on both backends ------------------------------------------------------


def test_a_run_reads_back_as_recorded(store: RunStore) -> None:
    run = make_run()
    store.create_run(run)
    r1, u1, e1, c1 = commit(store, 1)
    r2, u2, e2, _ = commit(store, 2, checkpoint=False)

    expected_run = RunRecord(**{**vars(run), "last_round": 2, "audit_head": "head-2", "audit_seq": 20})
    assert store.get_run("run-1") == expected_run
    assert store.rounds("run-1") == [r1, r2]
    assert store.updates("run-1") == u1 + u2
    assert store.updates("run-1", round=2) == u2
    assert store.events("run-1") == e1 + e2
    assert store.checkpoints("run-1") == [c1]
    assert store.latest_checkpoint("run-1") == c1
    exported = store.export("run-1")
    assert json.loads(json.dumps(exported, allow_nan=False)) == exported
    assert exported["rounds"][1]["bytes_up"] == 3 * 2**33
    assert [len(exported[k]) for k in ("rounds", "updates", "checkpoints", "events")] == [2, 6, 1, 2]

    store.finish_run("run-1", "failed", error="CUDA out of memory", audit_head="head-end", audit_seq=21)
    finished = store.get_run("run-1")
    assert (finished.status, finished.error, finished.audit_head, finished.audit_seq) == (
        "failed", "CUDA out of memory", "head-end", 21)
    assert finished.ended_at is not None and abs(finished.ended_at - time.time()) < 60


def test_runs_are_listed_newest_first(store: RunStore) -> None:
    for run_id, started in (("a_1", 3.0), ("ab1", 1.0), ("b", 2.0)):
        store.create_run(make_run(run_id, started))
    assert [r.run_id for r in store.list_runs()] == ["a_1", "b", "ab1"]
    assert [r.run_id for r in store.list_runs(limit=2)] == ["a_1", "b"]
    assert [r.run_id for r in store.find_runs("a_")] == ["a_1"]  # "_" is not a LIKE wildcard here
    assert [r.run_id for r in store.find_runs("a")] == ["a_1", "ab1"]


def test_non_finite_and_numpy_metrics_are_recorded(store: RunStore) -> None:
    store.create_run(make_run())
    round_ = RoundRecord("run-1", 1, 1, {"loss": math.nan, "top": math.inf, "acc": np.float32(0.5),
                                         "per_class": np.array([1, 2])}, 1.0, 2.0, [])
    store.commit_round("run-1", round_, [], [], None, audit_head="h", audit_seq=1)
    assert store.rounds("run-1")[0].metrics == {"loss": "NaN", "top": "Infinity", "acc": 0.5, "per_class": [1, 2]}


def test_commit_round_is_all_or_nothing(store: RunStore) -> None:
    store.create_run(make_run())
    before = [commit(store, 1)]
    round_, updates, events, ckpt = make_round(2)
    updates[1].status = "bogus"  # past the record's validation; the database's CHECK refuses it

    with pytest.raises(StoreError, match="refused to commit round 2 of run 'run-1'"):
        store.commit_round("run-1", round_, updates, events, ckpt, audit_head="head-2", audit_seq=20)

    r1, u1, e1, c1 = before[0]
    assert store.rounds("run-1") == [r1]
    assert store.updates("run-1") == u1
    assert store.events("run-1") == e1
    assert store.checkpoints("run-1") == [c1]
    run = store.get_run("run-1")
    assert (run.last_round, run.audit_head, run.audit_seq) == (1, "head-1", 10)


def test_parts_of_another_round_are_refused(store: RunStore) -> None:
    store.create_run(make_run())
    round_, updates, events, ckpt = make_round(2)
    with pytest.raises(ValueError, match=r"update \(run_id, round, attempt\) is \('run-1', 1, 1\)"):
        store.commit_round("run-1", round_, make_round(1)[1], events, ckpt, audit_head="h", audit_seq=1)
    with pytest.raises(ValueError, match="finish_run status must be one of completed"):
        store.finish_run("run-1", "running")
    assert store.rounds("run-1") == []


def test_a_resumed_round_is_kept_beside_the_first(store: RunStore, store_url: str) -> None:
    store.create_run(make_run())
    r1, *_ = commit(store, 1)
    commit(store, 2)
    commit(store, 3, checkpoint=False)
    store.finish_run("run-1", "interrupted", error="preempted")

    assert store.start_attempt("run-1") == 2
    resumed = store.get_run("run-1")
    assert (resumed.status, resumed.attempt, resumed.ended_at, resumed.error) == ("running", 2, None, None)
    r2b, u2b, _, c2b = commit(store, 2, attempt=2)

    assert [(r.round, r.attempt) for r in store.rounds("run-1")] == [(1, 1), (2, 1), (2, 2), (3, 1)]
    assert store.rounds("run-1", effective_only=True) == [r1, r2b]
    assert store.updates("run-1", round=2)[-3:] == u2b
    assert store.latest_checkpoint("run-1") == c2b
    assert store.get_run("run-1").last_round == 2
    with pytest.raises(StoreError, match="round 4 of run 'run-1' is from attempt 1, but the run is at attempt 2"):
        commit(store, 4, attempt=1)  # a process of the interrupted attempt that is still going
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        filed = conn.execute(sa.text("SELECT round, attempt FROM checkpoints ORDER BY id")).all()
    assert filed == [(1, 1), (2, 1), (2, 2)]
    engine.dispose()


def test_a_run_id_is_never_reused(store: RunStore) -> None:
    store.create_run(make_run())
    with pytest.raises(StoreError, match="run 'run-1' already exists in the store at"):
        store.create_run(make_run(started_at=2000.0))
    assert store.get_run("run-1").started_at == 1000.0


def test_an_unknown_run_is_named_in_one_line(store: RunStore) -> None:
    with pytest.raises(UnknownRunError) as raised:
        store.get_run("nope")
    assert str(raised.value) == f"no run 'nope' in the store at {store.url}"
    for operation in (
        lambda: store.rounds("nope"),
        lambda: store.start_attempt("nope"),
        lambda: store.finish_run("nope", "completed"),
        lambda: store.commit_round("nope", *make_round(1, run_id="nope"), audit_head="h", audit_seq=1),
    ):
        with pytest.raises(UnknownRunError, match="^no run 'nope' in the store at [^\n]*$"):
            operation()


def test_sqlite_is_set_up_for_durability(tmp_path: Path) -> None:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'a' / 'b.db'}", timeout_s=0.25)
    with engine.connect() as conn:
        pragmas = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in
                   ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")]
    engine.dispose()
    assert pragmas == ["wal", 2, 1, 250]  # synchronous 2 = FULL


# -- locks and outages ----------------------------------------------------------------


def hold_write_lock(url: str) -> Callable[[], None]:
    """Take the database's write lock from another connection; returns its release."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        holder = sqlite3.connect(parsed.database, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
    else:
        import psycopg

        holder = psycopg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False))
        holder.execute("LOCK TABLE runs IN EXCLUSIVE MODE")  # readers may go on, writers wait

    def release() -> None:
        holder.rollback()
        holder.close()

    return release


def test_a_locked_store_is_retried_then_reported(store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    options = {"retries": 2, "retry_wait_s": 0.01, "timeout_s": 0.1}
    with RunStore(store_url, **options) as strict, RunStore(store_url, best_effort=True, **options) as lenient:
        strict.create_run(make_run())
        release = hold_write_lock(store_url)
        try:
            with pytest.raises(StoreError) as raised:
                commit(strict, 1)
            message = str(raised.value)
            assert message.startswith(f"run store at {strict.url} unavailable after 3 tries: ")
            assert "\n" not in message
            assert strict.get_run("run-1").last_round == 0  # reads go on while a writer holds the lock

            with caplog.at_level(logging.WARNING, logger="fedapp.store"):
                lenient.finish_run("run-1", "completed")  # returns: the run goes on without its record
            warnings = [r for r in caplog.records if r.name == "fedapp.store"]
            assert [r.levelno for r in warnings] == [logging.WARNING]
            assert "could not finish run 'run-1' (best effort" in warnings[0].getMessage()
            with pytest.raises(StoreError):
                lenient.start_attempt("run-1")  # its caller needs the answer: raises even in best effort
        finally:
            release()
        assert lenient.get_run("run-1").status == "running"


def test_a_lock_released_during_the_retries_costs_only_time(store_url: str) -> None:
    with RunStore(store_url, retries=6, retry_wait_s=0.05, timeout_s=0.1) as patient:
        patient.create_run(make_run())
        release = hold_write_lock(store_url)
        timer = threading.Timer(0.3, release)
        timer.start()
        try:
            commit(patient, 1)
        finally:
            timer.join()
        assert patient.get_run("run-1").last_round == 1


def test_an_unreachable_server_is_reported_after_the_retries() -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql+psycopg://fedapp:s3cret@127.0.0.1:{port}/runs"
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        RunStore(url, retries=2, retry_wait_s=0.01, timeout_s=1.0)
    message = str(raised.value)
    masked = f"postgresql+psycopg://fedapp:***@127.0.0.1:{port}/runs"
    assert message.startswith(f"run store at {masked} unavailable after 3 tries: ")
    assert "s3cret" not in message and "\n" not in message
    assert time.monotonic() - started < 10


# -- schema migrations ----------------------------------------------------------------


def test_an_empty_database_is_upgraded_to_the_models(store_url: str) -> None:
    RunStore(store_url, **FAST).close()
    assert current_revision(store_url) == head_revision() == "0003"
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), METADATA) == []  # migrations == METADATA
    engine.dispose()
    RunStore(store_url, **FAST).close()  # opening again is a no-op
    assert current_revision(store_url) == "0003"


def test_a_database_of_the_first_schema_keeps_its_rows(store_url: str) -> None:
    config = alembic_config(store_url)
    command.upgrade(config, "0001")
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        old = sa.MetaData()
        old.reflect(conn)
        assert "attempt" not in old.tables["rounds"].c
        run, (r1, u1, e1, c1) = make_run(), make_round(1)
        conn.execute(old.tables["runs"].insert(), {**without_attempt(run), "last_round": 1})
        conn.execute(old.tables["rounds"].insert(), without_attempt(r1))
        conn.execute(old.tables["client_updates"].insert(), [without_attempt(u) for u in u1])
        conn.execute(old.tables["events"].insert(), [vars(e) for e in e1])
        conn.execute(old.tables["checkpoints"].insert(), vars(c1))
    engine.dispose()

    with RunStore(store_url, **FAST) as store:
        assert store.get_run("run-1") == RunRecord(**{**vars(run), "last_round": 1, "attempt": 1})
        assert store.rounds("run-1") == [r1]
        assert store.updates("run-1") == u1
        assert store.events("run-1") == e1
        assert store.checkpoints("run-1") == [c1]
        assert store.start_attempt("run-1") == 2
        r1b, *_ = commit(store, 1, attempt=2)  # the new key lets round 1 be recorded again
        assert store.rounds("run-1", effective_only=True) == [r1b]
        with pytest.raises(StoreError, match="refused to commit round 2"):
            bad = make_round(2, attempt=2)
            bad[1][0].status = "lost"  # the status CHECK survived the upgrade
            store.commit_round("run-1", *bad, audit_head="h", audit_seq=1)
    assert current_revision(store_url) == head_revision()
    config.stdout = io.StringIO()
    command.current(config)  # standalone env.py, from the URL
    assert config.stdout.getvalue().strip() == "0003 (head)"


def without_attempt(record: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in ("attempt", "reputation")}  # columns of later revisions


def test_two_processes_open_a_fresh_database_at_once(store_url: str, tmp_path: Path) -> None:
    script = (
        "import sys, time, pathlib\n"
        "from fedapp.store import RunStore\n"
        "ready, other = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])\n"
        "ready.touch()\n"
        "deadline = time.monotonic() + 30\n"
        "while not other.exists() and time.monotonic() < deadline: time.sleep(0.005)\n"
        "RunStore(sys.argv[1]).close()  # the lock orders the upgrades; a connect that meets it retries\n"
    )
    a, b = tmp_path / "a.ready", tmp_path / "b.ready"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, store_url, str(x), str(y)], stderr=subprocess.PIPE, text=True)
        for x, y in ((a, b), (b, a))
    ]
    results = [(p.wait(timeout=60), p.communicate()[1]) for p in procs]
    assert results == [(0, ""), (0, "")]
    assert current_revision(store_url) == head_revision()
    with RunStore(store_url, **FAST) as store:
        assert store.list_runs() == []
