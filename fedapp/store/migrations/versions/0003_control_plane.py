"""Control plane: operators' actions, API tokens, and each client's reputation.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``actions`` is the queue between ``fedapp serve`` (which writes an operator's
request) and the ServerApp (which applies it at the next round boundary and
records the outcome in the same row). ``api_tokens`` holds the identity of every
issued token (never the token or its signing secret), so a revoked one is
refused. ``client_updates.reputation`` is the detector's reputation of the
client after the round (null when no detector runs).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "actions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("token_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("boundary_round", sa.Integer),
        sa.Column("effective_round", sa.Integer),
        sa.Column("applied_at", sa.Float),
        sa.Column("result", sa.Text, nullable=False, server_default=""),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_actions_run_id_runs"),
        sa.CheckConstraint("status IN ('pending', 'applied', 'refused')", name="ck_actions_status"),
    )
    op.create_index("ix_actions_run_id_status", "actions", ["run_id", "status"])
    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(64), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.PrimaryKeyConstraint("token_id", name="pk_api_tokens"),
        sa.CheckConstraint("role IN ('viewer', 'operator')", name="ck_api_tokens_role"),
    )
    with op.batch_alter_table("client_updates") as batch:
        batch.add_column(sa.Column("reputation", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("client_updates") as batch:
        batch.drop_column("reputation")
    op.drop_table("api_tokens")
    op.drop_index("ix_actions_run_id_status", table_name="actions")
    op.drop_table("actions")
