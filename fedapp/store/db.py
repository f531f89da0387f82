"""The run store's database: runs, rounds, client updates, checkpoints and events.

One :class:`RunStore` per process, on any SQLAlchemy URL: an SQLite file for one
machine, PostgreSQL when several machines (or people) share the record. Why a
database and not the JSON files beside the run: a round's rows, its checkpoint
and the audit head must be recorded together or not at all
(:meth:`RunStore.commit_round` is one transaction), and many runs must be
queryable in one place.

The schema is owned by the Alembic migrations in ``migrations/`` (written by
hand; :data:`METADATA` describes the head revision and a test checks that the
two agree). Opening a store upgrades its database to head, under a lock, so two
processes opening a fresh database at once do not both create it.

Availability: every operation is retried on :class:`sqlalchemy.exc.OperationalError`
(a locked SQLite file, a PostgreSQL server that is restarting) with exponential
backoff, then fails with a :class:`StoreError` naming the store. A store opened
with ``best_effort=True`` logs a write it could not make and lets the run go on.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url

from fedapp.store.records import (
    RUN_STATUSES,
    UPDATE_STATUSES,
    CheckpointRecord,
    ClientUpdateRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
)

LOGGER = logging.getLogger("fedapp.store")
MIGRATIONS = Path(__file__).resolve().with_name("migrations")
_T = TypeVar("_T")
_R = TypeVar("_R")
# Serialises schema upgrades across processes on PostgreSQL (any constant; "feda").
_PG_MIGRATION_LOCK = 0x66656461
# Alembic's `context` is a module-level proxy: two upgrades in two threads would share it.
_ALEMBIC_LOCK = threading.Lock()
_WRITE = "fedapp_write"


class StoreError(RuntimeError):
    """The run store could not do what was asked; one line that names the store (password masked)."""


class UnknownRunError(StoreError):
    """No run with that id in this store."""


METADATA = sa.MetaData()


def _status_check(column: str, allowed: tuple[str, ...], name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IN ({', '.join(repr(s) for s in allowed)})", name=name)


RUNS = sa.Table(
    "runs",
    METADATA,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False),
    sa.Column("code_version", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("output_dir", sa.Text, nullable=False),
    sa.Column("last_round", sa.Integer, nullable=False, server_default="0"),
    sa.Column("audit_head", sa.String(255), nullable=False, server_default=""),
    sa.Column("audit_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.PrimaryKeyConstraint("run_id", name="pk_runs"),
    _status_check("status", RUN_STATUSES, "ck_runs_status"),
)

ROUNDS = sa.Table(
    "rounds",
    METADATA,
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=False),
    sa.Column("participants", sa.JSON, nullable=False),
    sa.Column("bytes_up", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bytes_down", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.PrimaryKeyConstraint("run_id", "round", "attempt", name="pk_rounds"),
    sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_rounds_run_id_runs"),
)

CLIENT_UPDATES = sa.Table(
    "client_updates",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("client", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("num_examples", sa.Integer),
    sa.Column("update_norm", sa.Float),
    sa.Column("anomaly_score", sa.Float),
    sa.Column("epsilon", sa.Float),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_client_updates_run_id_runs"),
    sa.Index("ix_client_updates_run_id_round", "run_id", "round"),
    _status_check("status", UPDATE_STATUSES, "ck_client_updates_status"),
)

CHECKPOINTS = sa.Table(
    "checkpoints",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("write_s", sa.Float, nullable=False),
    sa.Column("audit_head", sa.String(255), nullable=False),
    sa.Column("audit_seq", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_checkpoints_run_id_runs"),
    sa.Index("ix_checkpoints_run_id_round", "run_id", "round"),
)

EVENTS = sa.Table(
    "events",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("fields", sa.JSON, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_events_run_id_runs"),
    sa.Index("ix_events_run_id", "run_id"),
)


def _json_safe(value: Any) -> Any:
    """JSON that every backend accepts: PostgreSQL's JSON type refuses NaN and Infinity.

    A diverged run reports a NaN loss; it must still be recorded, so non-finite
    floats become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, and
    numpy values (metrics often are) become Python ones.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _json_safe(value.tolist())
    return value


def _json_dumps(value: Any) -> str:
    return json.dumps(_json_safe(value), allow_nan=False)


def create_store_engine(url: str, *, timeout_s: float = 5.0) -> Engine:
    """An engine set up for the store: durable SQLite, or PostgreSQL with bounded waits.

    ``timeout_s`` bounds one try's wait for another writer's lock (SQLite busy
    timeout, PostgreSQL ``lock_timeout``) and, on PostgreSQL, for the connection.
    SQLite: the folder is created; WAL lets readers (a dashboard) read while a
    run writes; ``synchronous=FULL`` syncs the WAL at each commit, so a committed
    round survives a power cut, not only a crash (NORMAL would be enough for a
    crash; a commit per round makes FULL's cost negligible); foreign keys are on
    (SQLite's default is off). Transactions begin explicitly (the documented
    pysqlite recipe) so that writes take the lock up front (``BEGIN IMMEDIATE``)
    and wait for it under the busy timeout, instead of failing at once when a
    read transaction cannot be upgraded.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"json_serializer": _json_dumps, "pool_pre_ping": True}
    if backend == "postgresql":
        options["connect_args"] = {
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "options": f"-c lock_timeout={max(1, round(timeout_s * 1000))}",
        }
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(parsed, **options)
    if backend == "sqlite":
        busy_ms = max(1, round(timeout_s * 1000))

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below decides
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def alembic_config(url: str | None = None, *, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for the packaged migrations, without an ini file.

    Give ``connection`` to migrate inside a transaction the caller holds (what
    :class:`RunStore` does), or ``url`` for standalone use, e.g.
    ``alembic.command.upgrade(alembic_config(url), "0001")`` or ``command.current``.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser escapes
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def migration_transaction(conn: Connection) -> Iterator[Connection]:
    """One locked transaction for a schema upgrade, so concurrent openers take turns.

    PostgreSQL: a transaction-scoped advisory lock; the second opener waits,
    then sees the upgraded schema. SQLite: ``BEGIN IMMEDIATE``, with foreign keys
    switched off first (SQLite's own procedure for changing a table: batch mode
    drops and recreates tables, which foreign keys would cascade into or refuse)
    and checked with ``PRAGMA foreign_key_check`` before the commit. The pragma
    works only outside a transaction, hence on the raw connection, which is
    discarded afterwards rather than returned to the pool with foreign keys off.
    """
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
    try:
        conn.execution_options(**{_WRITE: True})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            yield conn
            if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                where = conn.engine.url.render_as_string(hide_password=True)
                raise StoreError(f"run store at {where}: schema upgrade left rows whose run is missing; rolled back")
    finally:
        if sqlite:
            conn.invalidate()


def _upgrade(conn: Connection) -> None:
    with _ALEMBIC_LOCK, migration_transaction(conn):
        command.upgrade(alembic_config(connection=conn), "head")


def _one_line(exc: BaseException) -> str:
    """The first line of the driver's message (psycopg's run over several lines)."""
    text = str(getattr(exc, "orig", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _record(cls: type[_R], row: sa.Row[Any]) -> _R:
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def effective_rounds(rounds: list[RoundRecord]) -> list[RoundRecord]:
    """The rounds the run's latest model descends from, one per round number.

    An attempt resumes from a checkpoint, so it supersedes every round of the
    earlier attempts from its first round on, not only the rounds it re-ran:
    if attempt 1 reached round 7 and attempt 2, resumed from round 5, has done
    round 6 so far, the lineage is rounds 1-5 of attempt 1 and round 6 of
    attempt 2; round 7 of attempt 1 belongs to a model that was abandoned.
    """
    kept: list[RoundRecord] = []
    cutoff = math.inf
    for attempt in sorted({r.attempt for r in rounds}, reverse=True):
        own = [r for r in rounds if r.attempt == attempt]
        kept.extend(r for r in own if r.round < cutoff)
        cutoff = min(cutoff, min(r.round for r in own))
    return sorted(kept, key=lambda r: r.round)


class RunStore:
    """Durable record of runs; see the module docstring.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``sqlite:///outputs/fedapp.db`` or
        ``postgresql+psycopg://user:pw@host/db``.
    retries
        Further tries after an operation fails with an operational error
        (total tries: ``retries + 1``). (default: 5)
    retry_wait_s
        Wait before the first retry, doubled for each next one. (default: 0.2)
    best_effort
        Log writes that fail (WARNING on ``fedapp.store``) and return instead of
        raising, so a sweep is not stopped by its bookkeeping. Reads, and
        :meth:`start_attempt` whose answer the caller needs, still raise. (default: False)
    timeout_s
        How long one try waits for a lock or a connection. (default: 5.0)
    """

    def __init__(
        self,
        url: str,
        *,
        retries: int = 5,
        retry_wait_s: float = 0.2,
        best_effort: bool = False,
        timeout_s: float = 5.0,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        if retry_wait_s < 0:
            raise ValueError(f"retry_wait_s must be >= 0, not {retry_wait_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        try:
            self.url = make_url(url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            raise ValueError("RunStore url must be an SQLAlchemy URL (dialect+driver://...)") from None
        self.best_effort = best_effort
        self._tries = retries + 1
        self._retry_wait_s = retry_wait_s
        try:
            self._engine = create_store_engine(url, timeout_s=timeout_s)
        except (ImportError, sa.exc.NoSuchModuleError) as exc:
            raise StoreError(f"run store at {self.url}: database driver missing: {_one_line(exc)}") from exc
        try:
            self._retrying("upgrade its schema", self._open)
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (a PostgreSQL database can then be dropped)."""
        self._engine.dispose()

    # -- writes -------------------------------------------------------------

    def create_run(self, run: RunRecord) -> None:
        """Record a new run; an id already in the store is refused (runs are never overwritten)."""

        def work(conn: Connection) -> None:
            if conn.execute(sa.select(RUNS.c.run_id).where(RUNS.c.run_id == run.run_id)).first():
                raise StoreError(f"run {run.run_id!r} already exists in the store at {self.url}")
            conn.execute(RUNS.insert().values(**asdict(run)))

        self._write(f"create run {run.run_id!r}", work)

    def commit_round(
        self,
        run_id: str,
        round: RoundRecord,  # noqa: A002 - the record's own name
        updates: list[ClientUpdateRecord],
        events: list[EventRecord],
        checkpoint: CheckpointRecord | None,
        *,
        audit_head: str,
        audit_seq: int,
    ) -> bool:
        """Record a finished round in one transaction: all of it, or nothing (False: best effort failed).

        The round, its client updates, its events, its checkpoint (if one was
        written; filed under the round's attempt) and the run's ``last_round`` and
        audit head move together, so a crash never leaves a checkpoint without its
        round or an audit head that points past what is stored. A round from an
        attempt other than the run's current one (a stale process still going
        after a resume) is refused.
        """
        _check_round_parts(run_id, round, updates, events, checkpoint)

        def work(conn: Connection) -> None:
            current = self._attempt_of(conn, run_id, lock=True)
            if current != round.attempt:
                raise StoreError(
                    f"round {round.round} of run {run_id!r} is from attempt {round.attempt},"
                    f" but the run is at attempt {current} in the store at {self.url}"
                )
            conn.execute(
                RUNS.update()
                .where(RUNS.c.run_id == run_id)
                .values(last_round=round.round, audit_head=audit_head, audit_seq=audit_seq)
            )
            conn.execute(ROUNDS.insert().values(**asdict(round)))
            if updates:
                conn.execute(CLIENT_UPDATES.insert(), [asdict(u) for u in updates])
            if events:
                conn.execute(EVENTS.insert(), [asdict(e) for e in events])
            if checkpoint is not None:
                conn.execute(CHECKPOINTS.insert().values(**asdict(checkpoint), attempt=round.attempt))

        return self._write(f"commit round {round.round} of run {run_id!r}", work)

    def add_events(
        self,
        run_id: str,
        events: list[EventRecord],
        *,
        audit_head: str | None = None,
        audit_seq: int | None = None,
    ) -> None:
        """Record events outside a round (start, resume, end), moving the audit head with them."""
        for e in events:
            _check_same("event run_id", e.run_id, run_id)

        def work(conn: Connection) -> None:
            self._attempt_of(conn, run_id)
            if events:
                conn.execute(EVENTS.insert(), [asdict(e) for e in events])
            self._set_audit(conn, run_id, audit_head, audit_seq)

        self._write(f"add events to run {run_id!r}", work)

    def start_attempt(self, run_id: str) -> int:
        """Mark a run as running again for a resume; returns the new attempt number.

        Raises even with ``best_effort``: the caller labels every later round
        with this number and has no right one to go on with.
        """

        def work(conn: Connection) -> int:
            attempt = self._attempt_of(conn, run_id, lock=True) + 1
            conn.execute(
                RUNS.update()
                .where(RUNS.c.run_id == run_id)
                .values(status="running", attempt=attempt, ended_at=None, error=None)
            )
            return attempt

        return self._retrying(f"start a new attempt of run {run_id!r}", lambda: self._transaction(work, write=True))

    def finish_run(
        self,
        run_id: str,
        status: str,
        *,
        error: str | None = None,
        audit_head: str | None = None,
        audit_seq: int | None = None,
    ) -> None:
        """Record how a run ended (``completed``, ``failed`` or ``interrupted``) and when."""
        ended = tuple(s for s in RUN_STATUSES if s != "running")
        if status not in ended:
            raise ValueError(f"finish_run status must be one of {', '.join(ended)}, not {status!r}")

        def work(conn: Connection) -> None:
            self._attempt_of(conn, run_id)
            conn.execute(
                RUNS.update()
                .where(RUNS.c.run_id == run_id)
                .values(status=status, ended_at=time.time(), error=error)
            )
            self._set_audit(conn, run_id, audit_head, audit_seq)

        self._write(f"finish run {run_id!r}", work)

    # -- reads --------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord:
        """The run, or :class:`UnknownRunError`."""
        return self._read(f"read run {run_id!r}", lambda conn: self._run(conn, run_id))

    def find_runs(self, prefix: str) -> list[RunRecord]:
        """Runs whose id starts with ``prefix`` (newest first), for short ids typed by hand."""
        query = RUNS.select().where(RUNS.c.run_id.startswith(prefix, autoescape=True))
        return self._read("find runs", lambda conn: self._runs(conn, query))

    def list_runs(self, limit: int | None = None) -> list[RunRecord]:
        """All runs, newest first (by start time), at most ``limit`` of them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        return self._read("list runs", lambda conn: self._runs(conn, RUNS.select().limit(limit)))

    def rounds(self, run_id: str, *, effective_only: bool = False) -> list[RoundRecord]:
        """Every attempt's rounds by (round, attempt); ``effective_only``: see :func:`effective_rounds`."""
        rounds = self._read(f"read rounds of run {run_id!r}", lambda conn: self._rounds(conn, run_id))
        return effective_rounds(rounds) if effective_only else rounds

    def updates(self, run_id: str, *, round: int | None = None) -> list[ClientUpdateRecord]:  # noqa: A002
        """Client updates by (round, attempt, order recorded), of one round if given."""
        return self._read(f"read updates of run {run_id!r}", lambda conn: self._updates(conn, run_id, round))

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        """Checkpoints in the order they were written."""
        return self._read(f"read checkpoints of run {run_id!r}", lambda conn: self._checkpoints(conn, run_id))

    def latest_checkpoint(self, run_id: str) -> CheckpointRecord | None:
        """The checkpoint written last (the one to resume from), or None."""
        checkpoints = self.checkpoints(run_id)
        return checkpoints[-1] if checkpoints else None

    def events(self, run_id: str) -> list[EventRecord]:
        """Events in the order they were recorded."""
        return self._read(f"read events of run {run_id!r}", lambda conn: self._events(conn, run_id))

    def export(self, run_id: str) -> dict[str, Any]:
        """Everything about one run as JSON-ready dicts, read in one transaction (one snapshot)."""

        def work(conn: Connection) -> dict[str, Any]:
            return {
                "run": asdict(self._run(conn, run_id)),
                "rounds": [asdict(r) for r in self._rounds(conn, run_id)],
                "updates": [asdict(u) for u in self._updates(conn, run_id, None)],
                "checkpoints": [asdict(c) for c in self._checkpoints(conn, run_id)],
                "events": [asdict(e) for e in self._events(conn, run_id)],
            }

        return self._read(f"export run {run_id!r}", work)

    # -- internals ----------------------------------------------------------

    def _open(self) -> None:
        with self._engine.connect() as conn:
            try:
                _upgrade(conn)
            except CommandError as exc:  # e.g. the database is at a revision of a newer fedapp
                raise StoreError(f"run store at {self.url}: schema not upgradable: {_one_line(exc)}") from exc

    def _transaction(self, work: Callable[[Connection], _T], *, write: bool) -> _T:
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE: True})
            with conn.begin():
                return work(conn)

    def _retrying(self, what: str, operation: Callable[[], _T]) -> _T:
        """Run ``operation``; retry what may pass (operational errors), refuse the rest at once."""
        last: BaseException | None = None
        for i in range(self._tries):
            try:
                return operation()
            except sa.exc.DBAPIError as exc:
                if not (isinstance(exc, sa.exc.OperationalError) or exc.connection_invalidated):
                    raise StoreError(f"run store at {self.url} refused to {what}: {_one_line(exc)}") from exc
                last = exc
            except sa.exc.SQLAlchemyError as exc:
                raise StoreError(f"run store at {self.url} refused to {what}: {_one_line(exc)}") from exc
            if i + 1 < self._tries:
                time.sleep(self._retry_wait_s * 2**i)
        assert last is not None
        raise StoreError(f"run store at {self.url} unavailable after {self._tries} tries: {_one_line(last)}") from last

    def _read(self, what: str, work: Callable[[Connection], _T]) -> _T:
        return self._retrying(what, lambda: self._transaction(work, write=False))

    def _write(self, what: str, work: Callable[[Connection], None]) -> bool:
        """Run one write transaction; False when best effort swallowed a failure (the caller may care)."""
        try:
            self._retrying(what, lambda: self._transaction(work, write=True))
        except StoreError as exc:
            if not self.best_effort:
                raise
            LOGGER.warning("could not %s (best effort, the run goes on): %s", what, exc)
            return False
        return True

    def _no_run(self, run_id: str) -> UnknownRunError:
        return UnknownRunError(f"no run {run_id!r} in the store at {self.url}")

    def _attempt_of(self, conn: Connection, run_id: str, *, lock: bool = False) -> int:
        """The run's current attempt; ``lock`` holds its row until commit (PostgreSQL)."""
        query = sa.select(RUNS.c.attempt).where(RUNS.c.run_id == run_id)
        attempt = conn.execute(query.with_for_update() if lock else query).scalar()
        if attempt is None:
            raise self._no_run(run_id)
        return int(attempt)

    def _set_audit(self, conn: Connection, run_id: str, head: str | None, seq: int | None) -> None:
        values = {k: v for k, v in (("audit_head", head), ("audit_seq", seq)) if v is not None}
        if values:
            conn.execute(RUNS.update().where(RUNS.c.run_id == run_id).values(**values))

    def _run(self, conn: Connection, run_id: str) -> RunRecord:
        row = conn.execute(RUNS.select().where(RUNS.c.run_id == run_id)).first()
        if row is None:
            raise self._no_run(run_id)
        return _record(RunRecord, row)

    def _runs(self, conn: Connection, query: sa.Select[Any]) -> list[RunRecord]:
        query = query.order_by(RUNS.c.started_at.desc(), RUNS.c.run_id.desc())
        return [_record(RunRecord, row) for row in conn.execute(query)]

    def _rounds(self, conn: Connection, run_id: str) -> list[RoundRecord]:
        self._attempt_of(conn, run_id)
        query = ROUNDS.select().where(ROUNDS.c.run_id == run_id).order_by(ROUNDS.c.round, ROUNDS.c.attempt)
        return [_record(RoundRecord, row) for row in conn.execute(query)]

    def _updates(self, conn: Connection, run_id: str, round_: int | None) -> list[ClientUpdateRecord]:
        self._attempt_of(conn, run_id)
        table = CLIENT_UPDATES
        query = table.select().where(table.c.run_id == run_id)
        if round_ is not None:
            query = query.where(table.c.round == round_)
        query = query.order_by(table.c.round, table.c.attempt, table.c.id)
        return [_record(ClientUpdateRecord, row) for row in conn.execute(query)]

    def _checkpoints(self, conn: Connection, run_id: str) -> list[CheckpointRecord]:
        self._attempt_of(conn, run_id)
        query = CHECKPOINTS.select().where(CHECKPOINTS.c.run_id == run_id).order_by(CHECKPOINTS.c.id)
        return [_record(CheckpointRecord, row) for row in conn.execute(query)]

    def _events(self, conn: Connection, run_id: str) -> list[EventRecord]:
        self._attempt_of(conn, run_id)
        query = EVENTS.select().where(EVENTS.c.run_id == run_id).order_by(EVENTS.c.id)
        return [_record(EventRecord, row) for row in conn.execute(query)]


def _check_same(what: str, got: object, expected: object) -> None:
    if got != expected:
        raise ValueError(f"{what} is {got!r}, expected {expected!r}")


def _check_round_parts(
    run_id: str,
    round_: RoundRecord,
    updates: list[ClientUpdateRecord],
    events: list[EventRecord],
    checkpoint: CheckpointRecord | None,
) -> None:
    """Everything committed with a round must belong to it (a caller's mistake, not the store's)."""
    _check_same("round run_id", round_.run_id, run_id)
    for u in updates:
        _check_same(
            "update (run_id, round, attempt)", (u.run_id, u.round, u.attempt), (run_id, round_.round, round_.attempt)
        )
    for e in events:
        _check_same("event run_id", e.run_id, run_id)
    if checkpoint is not None:
        _check_same("checkpoint (run_id, round)", (checkpoint.run_id, checkpoint.round), (run_id, round_.round))
