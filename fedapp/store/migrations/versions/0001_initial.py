"""The first schema: runs, rounds, client updates, checkpoints and events, one attempt per run.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Kept as it was released, so a database created then can be upgraded: a round
is identified by (run_id, round) here; 0002 adds attempts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(255), nullable=False),
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
        sa.PrimaryKeyConstraint("run_id", name="pk_runs"),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'failed', 'interrupted')", name="ck_runs_status"
        ),
    )
    op.create_table(
        "rounds",
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Column("participants", sa.JSON, nullable=False),
        sa.Column("bytes_up", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("bytes_down", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("run_id", "round", name="pk_rounds"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_rounds_run_id_runs"),
    )
    op.create_table(
        "client_updates",
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
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_client_updates_run_id_runs"),
        sa.CheckConstraint(
            "status IN ('accepted', 'refused', 'declined', 'quarantined')", name="ck_client_updates_status"
        ),
    )
    op.create_index("ix_client_updates_run_id_round", "client_updates", ["run_id", "round"])
    op.create_table(
        "checkpoints",
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
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_checkpoints_run_id_runs"),
    )
    op.create_index("ix_checkpoints_run_id_round", "checkpoints", ["run_id", "round"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("fields", sa.JSON, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_events_run_id_runs"),
    )
    op.create_index("ix_events_run_id", "events", ["run_id"])


def downgrade() -> None:
    for table in ("events", "checkpoints", "client_updates", "rounds", "runs"):
        op.drop_table(table)
