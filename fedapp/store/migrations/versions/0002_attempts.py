"""Attempts: a resumed run re-runs rounds, and both versions of a round are kept.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

``runs.attempt`` counts resumes; rounds, client updates and checkpoints carry
the attempt that wrote them, and a round is identified by (run_id, round,
attempt). ``server_default="1"`` makes every existing row attempt 1. Batch mode
recreates ``rounds`` on SQLite (which cannot change a primary key in place) and
alters it in place on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TABLES = ("runs", "client_updates", "checkpoints")


def _attempt() -> sa.Column:
    return sa.Column("attempt", sa.Integer, nullable=False, server_default="1")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(_attempt())
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(_attempt())
        batch.drop_constraint("pk_rounds", type_="primary")
        batch.create_primary_key("pk_rounds", ["run_id", "round", "attempt"])


def downgrade() -> None:
    """Back to one row per round: keeps each round's latest attempt (the others cannot fit)."""
    op.execute(
        "DELETE FROM rounds WHERE attempt < (SELECT MAX(r.attempt) FROM rounds r"
        " WHERE r.run_id = rounds.run_id AND r.round = rounds.round)"
    )
    with op.batch_alter_table("rounds") as batch:
        batch.drop_constraint("pk_rounds", type_="primary")
        batch.create_primary_key("pk_rounds", ["run_id", "round"])
        batch.drop_column("attempt")
    for table in reversed(_TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("attempt")
