"""The run store's tables at the head revision, and how JSON columns are serialised.

The schema is owned by the hand-written Alembic migrations in ``migrations/``;
:data:`METADATA` describes their head and a test checks that the two agree.
"""

from __future__ import annotations

import json
import math
from typing import Any

import sqlalchemy as sa

from fedapp.store.records import ACTION_STATUSES, ROLES, RUN_STATUSES, UPDATE_STATUSES


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
    sa.Column("reputation", sa.Float),
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

ACTIONS = sa.Table(
    "actions",
    METADATA,
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
    sa.Index("ix_actions_run_id_status", "run_id", "status"),
    _status_check("status", ACTION_STATUSES, "ck_actions_status"),
)

API_TOKENS = sa.Table(
    "api_tokens",
    METADATA,
    sa.Column("token_id", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(255), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.PrimaryKeyConstraint("token_id", name="pk_api_tokens"),
    _status_check("role", ROLES, "ck_api_tokens_role"),
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
