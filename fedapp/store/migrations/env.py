"""Alembic environment of the run store.

Two ways in: :class:`fedapp.store.db.RunStore` passes the connection it holds
(``config.attributes["connection"]``, already inside a locked transaction), so
the upgrade uses the store's own engine and settings; standalone use
(``alembic.command.upgrade(fedapp.store.db.alembic_config(url), "head")``)
builds the same kind of engine from ``sqlalchemy.url`` and takes the same lock.
Online only: batch mode on SQLite must read the tables it recreates.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from fedapp.store.engine import create_store_engine, migration_transaction
from fedapp.store.schema import METADATA

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=METADATA, render_as_batch=True)
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("the run store's migrations run online only (no --sql): SQLite batch mode reads the tables")

given = config.attributes.get("connection")
if given is not None:
    run_migrations(given)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url or pass config.attributes['connection']")
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection, migration_transaction(connection):
            run_migrations(connection)
    finally:
        engine.dispose()
