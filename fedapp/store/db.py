"""The run store's database: runs, rounds, client updates, checkpoints and events.

One :class:`RunStore` per process, on any SQLAlchemy URL: an SQLite file for one
machine, PostgreSQL when several machines (or people) share the record. Why a
database and not the JSON files beside the run: a round's rows, its checkpoint
and the audit head must be recorded together or not at all
(:meth:`RunStore.commit_round` is one transaction), and many runs must be
queryable in one place.

The schema is owned by the Alembic migrations in ``migrations/`` (written by
hand; :mod:`fedapp.store.schema` describes the head revision and a test checks
that the two agree). Opening a store upgrades its database to head, under a
lock (:mod:`fedapp.store.engine`), so two processes opening a fresh database at
once do not both create it.

Availability: every operation is retried on :class:`sqlalchemy.exc.OperationalError`
(a locked SQLite file, a PostgreSQL server that is restarting) with exponential
backoff, then fails with a :class:`StoreError` naming the store. A store opened
with ``best_effort=True`` logs a write it could not make and lets the run go on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy.engine import Connection, make_url

# Re-exported: the store's one import point for its engine, schema and errors.
from fedapp.store.engine import WRITE_OPTION, _upgrade, alembic_config, create_store_engine, migration_transaction
from fedapp.store.errors import StoreError, UnknownRunError
from fedapp.store.schema import ACTIONS, API_TOKENS, CHECKPOINTS, CLIENT_UPDATES, EVENTS, METADATA, ROUNDS, RUNS
from fedapp.store.records import (
    RUN_STATUSES,
    UPDATE_STATUSES,
    ActionRecord,
    CheckpointRecord,
    ClientUpdateRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    TokenRecord,
)

LOGGER = logging.getLogger("fedapp.store")
_T = TypeVar("_T")
_R = TypeVar("_R")


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
            self._attempt_of(conn, run_id, lock=True)
            now = time.time()
            conn.execute(RUNS.update().where(RUNS.c.run_id == run_id).values(status=status, ended_at=now, error=error))
            self._set_audit(conn, run_id, audit_head, audit_seq)
            conn.execute(  # no boundary will come to apply what is still queued (add_action holds the same row lock)
                ACTIONS.update()
                .where(ACTIONS.c.run_id == run_id, ACTIONS.c.status == "pending")
                .values(status="refused", applied_at=now, result=f"the run ended ({status}) before the next round boundary")
            )

        self._write(f"finish run {run_id!r}", work)

    # -- operators' actions and API tokens (fedapp.api, fedapp.control) ------

    def add_action(self, action: ActionRecord) -> ActionRecord:
        """Queue an operator's request for a run that is still running; the stored record (with its id).

        A pending request for a run that has ended is refused (:class:`StoreError`):
        nothing would ever apply it. A request the API refused at once is recorded
        as ``refused`` (with its ``result``) so every attempt is on record. Raises
        even with ``best_effort``: the operator is waiting for the answer.
        """
        if action.status not in ("pending", "refused") or action.id is not None:
            raise ValueError("a new action is pending (or refused at once) and has no id yet")

        def work(conn: Connection) -> ActionRecord:
            self._attempt_of(conn, action.run_id, lock=True)  # finish_run cannot end the run between check and insert
            run = self._run(conn, action.run_id)
            if action.status == "pending" and run.status != "running":
                raise StoreError(f"run {action.run_id!r} is {run.status}; actions apply only to a running run")
            values = {k: v for k, v in asdict(action).items() if k != "id"}
            new_id = conn.execute(ACTIONS.insert().values(**values)).inserted_primary_key[0]
            return ActionRecord(**{**asdict(action), "id": int(new_id)})

        return self._retrying(f"queue an action for run {action.run_id!r}", lambda: self._transaction(work, write=True))

    def actions(self, run_id: str, *, status: str | None = None) -> list[ActionRecord]:
        """The run's actions in the order they were requested, only those in ``status`` if given."""

        def work(conn: Connection) -> list[ActionRecord]:
            self._attempt_of(conn, run_id)
            query = ACTIONS.select().where(ACTIONS.c.run_id == run_id)
            if status is not None:
                query = query.where(ACTIONS.c.status == status)
            return [_record(ActionRecord, row) for row in conn.execute(query.order_by(ACTIONS.c.id))]

        return self._read(f"read actions of run {run_id!r}", work)

    def get_action(self, run_id: str, action_id: int) -> ActionRecord | None:
        """One action of the run, or None (an id of another run is None too)."""

        def work(conn: Connection) -> ActionRecord | None:
            row = conn.execute(
                ACTIONS.select().where(ACTIONS.c.run_id == run_id, ACTIONS.c.id == action_id)
            ).first()
            return None if row is None else _record(ActionRecord, row)

        return self._read(f"read action {action_id} of run {run_id!r}", work)

    def settle_action(
        self,
        action_id: int,
        status: str,
        *,
        boundary_round: int,
        effective_round: int | None,
        result: str,
    ) -> bool:
        """Record the ServerApp's decision on a pending action; False if it was no longer pending."""
        if status not in ("applied", "refused"):
            raise ValueError(f"an action is settled as applied or refused, not {status!r}")
        settled = False

        def work(conn: Connection) -> None:
            nonlocal settled
            done = conn.execute(
                ACTIONS.update()
                .where(ACTIONS.c.id == action_id, ACTIONS.c.status == "pending")
                .values(status=status, boundary_round=boundary_round, effective_round=effective_round,
                        applied_at=time.time(), result=result)
            )
            settled = done.rowcount == 1

        self._write(f"settle action {action_id}", work)
        return settled

    def add_token(self, token: TokenRecord) -> None:
        """Record an issued token's identity (the API refuses tokens it has no record of)."""
        self._retrying(
            "record an API token",
            lambda: self._transaction(lambda conn: conn.execute(API_TOKENS.insert().values(**asdict(token))), write=True),
        )

    def get_token(self, token_id: str) -> TokenRecord | None:
        """The token's record, or None when the store never issued it."""

        def work(conn: Connection) -> TokenRecord | None:
            row = conn.execute(API_TOKENS.select().where(API_TOKENS.c.token_id == token_id)).first()
            return None if row is None else _record(TokenRecord, row)

        return self._read("read an API token", work)

    def revoke_token(self, token_id: str) -> TokenRecord | None:
        """Revoke a token from now on; its record (None when unknown). Revoking twice keeps the first time."""

        def work(conn: Connection) -> TokenRecord | None:
            conn.execute(
                API_TOKENS.update()
                .where(API_TOKENS.c.token_id == token_id, API_TOKENS.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            row = conn.execute(API_TOKENS.select().where(API_TOKENS.c.token_id == token_id)).first()
            return None if row is None else _record(TokenRecord, row)

        return self._retrying("revoke an API token", lambda: self._transaction(work, write=True))

    def tokens(self) -> list[TokenRecord]:
        """Every issued token's record, newest first."""
        query = API_TOKENS.select().order_by(API_TOKENS.c.issued_at.desc())
        return self._read("list API tokens", lambda conn: [_record(TokenRecord, r) for r in conn.execute(query)])

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
                conn.execution_options(**{WRITE_OPTION: True})
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


__all__ = [
    "METADATA", "RunStore", "StoreError", "UnknownRunError", "alembic_config", "create_store_engine",
    "effective_rounds", "migration_transaction",
]
