"""Engines and schema upgrades for the run store: durable SQLite, bounded PostgreSQL, Alembic to head."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url

from fedapp.store.errors import StoreError
from fedapp.store.schema import _json_dumps

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
# Serialises schema upgrades across processes on PostgreSQL (any constant; "feda").
_PG_MIGRATION_LOCK = 0x66656461
# Alembic's `context` is a module-level proxy: two upgrades in two threads would share it.
_ALEMBIC_LOCK = threading.Lock()
WRITE_OPTION = "fedapp_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)


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
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

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


MIGRATION_WAIT_S = 60.0  # how long a second opener waits for the first one's schema upgrade


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
        raw = conn.connection.dbapi_connection
        raw.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        # Waiting for another opener's upgrade is the point here, not a stuck writer: a loaded
        # machine can take longer than the usual busy timeout to import Alembic and migrate.
        raw.execute(f"PRAGMA busy_timeout={int(MIGRATION_WAIT_S * 1000)}")  # type: ignore[union-attr]
    try:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text(f"SET LOCAL lock_timeout = '{int(MIGRATION_WAIT_S)}s'"))
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
