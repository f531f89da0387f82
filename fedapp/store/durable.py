"""A durable run: the ServerApp's link to the run store, the checkpoints and the audit log.

What happens at each round boundary (:meth:`DurableRun.round_done`), in this
order, so that a crash at any point leaves a consistent previous round:

1. the round's audit entries are appended to ``audit.jsonl`` (one fsync):
   clients joined / declined / refused / excluded / quarantined / released,
   each client's privacy spend, the aggregation with the new model's digest;
2. every ``store.checkpoint_every`` rounds (and after the last), the
   checkpoint is written atomically, carrying the audit head of step 1, and a
   ``checkpoint`` entry with its SHA-256 is appended; the head is signed;
3. the round row, the client updates, the events and the checkpoint record
   are committed to the store in **one** transaction, with the audit head.

A crash between 1 and 3 leaves audit entries beyond the head the store
recorded (``verify_log`` reports them as an unrecorded tail) and possibly a
checkpoint file the store does not know: resume uses only the store's last
recorded checkpoint, whose SHA-256 must match.

Resuming (``store.resume=RUN_ID``) loads that checkpoint, refuses one written
under another configuration, verifies the audit chain up to the recorded
head, and continues the same chain with a ``resume`` entry naming the rounds
that were interrupted. Rounds after the checkpoint are trained again under a
new *attempt* number; the store keeps both attempts. Clients' own ledgers
(``privacy.client.ledger_dir``) are the source of truth for client epsilon, so
the spend of an interrupted round that clients trained in stays spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAvgM, Strategy

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.metrics import RunRecorder, read_jsonl
from fedapp.store.audit import AuditLog, key_fingerprint, load_signing_key, verify_log
from fedapp.store.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_name,
    model_digest,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from fedapp.store.db import RunStore, StoreError
from fedapp.store.records import (
    code_version,
    CheckpointRecord,
    ClientUpdateRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
)
from fedapp.store.settings import masked_url, resolve_store_url, run_config_hash
from fedapp.store.state import load_rng_state, load_strategy_state, rng_state, strategy_chain, strategy_state

if TYPE_CHECKING:
    from fedapp.control.applier import RunControl

log = logging.getLogger("fedapp.store")

AUDIT_FILE = "audit.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "run.lock"
STOP_FILE = "STOP"  # `fedapp runs stop` writes it; the run checkpoints and stops at the next round boundary
SERVER_SOURCE = "server accountant"
# (row key of the epsilon, row keys of the noise multiplier it was booked at)
_SERVER_SPEND = (
    ("central_epsilon", ("central_noise_multiplier", "distributed_noise_multiplier")),
    ("released_epsilon", ("distributed_noise_multiplier",)),
)

# recorder event kind -> (audit kind, client update status or None)
_EVENT_MAP: dict[str, tuple[str, str | None]] = {
    "client_excluded": ("client_excluded", "declined"),
    "update_rejected": ("client_refused", "refused"),
    "ciphertext_rejected": ("client_refused", "refused"),
    "update_dropped": ("client_refused", "refused"),
    "client_quarantined": ("client_quarantined", "quarantined"),
    "client_released": ("client_released", None),
    "fit_failure": ("client_refused", None),
    "admin_action": ("admin_action", None),  # an operator's request, settled at this boundary (fedapp.control)
}


def new_run_id(name: str) -> str:
    """``<name>-<UTC time>-<6 hex>``: sortable, readable, unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40] or "run"
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


@dataclass
class _RoundLines:
    clients: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


class DurableRun:
    """One run's store record, checkpoints and audit chain, driven by the round loop."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        recorder: RunRecorder,
        store: RunStore,
        run: RunRecord,
        audit: AuditLog,
        *,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.store = store
        self.run = run
        self.audit = audit
        self.checkpoint = checkpoint
        self.attempt = run.attempt
        self.output_dir = Path(run.output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINT_DIR
        self.seen_clients: set[str] = set(checkpoint.meta.get("seen_clients", [])) if checkpoint else set()
        self._round_started = time.time()
        self.trained_rounds = int(checkpoint.meta.get("trained_rounds", 0)) if checkpoint else 0
        self.status, self.error = "running", None
        self.overhead_s: dict[int, float] = {}  # seconds spent at each round boundary (audit + checkpoint + commit)
        self.stopping: dict[str, Any] | None = None
        self.control: RunControl | None = None  # operators' actions (fedapp.control), applied in round_done
        self._lock: Any = None
        self._replay: list[dict[str, Any]] = []
        self._released: set[int] = set()

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, cfg: ExperimentConfig) -> tuple["DurableRun", RunRecorder]:
        """Create the run (or reopen it for ``store.resume``); the recorder it writes through."""
        st = cfg.store
        url = resolve_store_url(st.url)
        store = RunStore(url, retries=st.retries, best_effort=st.best_effort)
        signing_key = load_signing_key(st.audit_key) if st.audit_key else None
        if st.resume:
            try:
                return cls._resume(cfg, store, signing_key)
            except BaseException:
                store.close()
                raise
        run_id = st.run_id or new_run_id(cfg.name)
        out = Path(cfg.runtime.output_dir).resolve()
        lock = hold_run_lock(out, run_id)
        recorder = RunRecorder(out)
        run = RunRecord(
            run_id=run_id, name=cfg.name, config=cfg.to_dict(), config_hash=run_config_hash(cfg),
            code_version=code_version(), status="running", started_at=time.time(), output_dir=str(out),
        )
        audit = AuditLog(out / AUDIT_FILE, run_id=run_id, signing_key=signing_key)
        store.create_run(run)
        audit.append(
            "run_start", 0, name=cfg.name, config_hash=run.config_hash, code_version=run.code_version,
            mode=cfg.runtime.mode, num_rounds=cfg.num_rounds, signed=signing_key is not None,
            audit_key=key_fingerprint(signing_key.public_key()) if signing_key else None,
        )
        audit.sign_head()
        store.add_events(run_id, [], audit_head=audit.head, audit_seq=audit.seq)
        log.info("run %s recorded in %s", run_id, masked_url(url))
        durable = cls(cfg, recorder, store, run, audit)
        durable._lock = lock
        return durable, recorder

    @classmethod
    def _resume(cls, cfg: ExperimentConfig, store: RunStore, signing_key: Any) -> tuple["DurableRun", RunRecorder]:
        """Reopen a run at its last checkpoint, after checking everything it rests on.

        What a resume trusts is the audit chain, verified with the operator's key when one
        is configured: the run store and the output folder are writable by the same
        insider the audit log guards against. So the run's config must match the
        ``run_start`` entry's hash, the checkpoint must be the one a ``checkpoint`` entry
        of the chain names, and the server's privacy spend logged after that checkpoint
        is booked again (those models were released).
        """
        run_id = cfg.store.resume
        run = store.get_run(run_id)
        if run.status == "completed":
            raise ConfigError(f"run {run_id} already completed all its rounds; nothing to resume")
        expected = run_config_hash(cfg)
        if expected != run.config_hash:
            raise ConfigError(
                f"run {run_id} was started with config {run.config_hash[:12]}, this one is {expected[:12]}: "
                "resume it with the run's own config (`fedapp resume RUN_ID` reads it from the store)"
            )
        _require_ledgers(cfg)
        out = Path(run.output_dir)
        lock = hold_run_lock(out, run_id)
        try:
            return cls._reopen(cfg, store, signing_key, run, expected, lock)
        except BaseException:
            release_run_lock(lock)
            raise

    @classmethod
    def _reopen(
        cls, cfg: ExperimentConfig, store: RunStore, signing_key: Any, run: RunRecord, expected: str, lock: Any
    ) -> tuple["DurableRun", RunRecorder]:
        run_id, out = run.run_id, Path(run.output_dir)
        audit_path = out / AUDIT_FILE
        torn = set_aside_torn_tail(audit_path, recorded_seq=run.audit_seq)
        public_key = signing_key.public_key() if signing_key else None
        report = verify_log(audit_path, expected_head=(run.audit_seq, run.audit_head), run_id=run_id, public_key=public_key)
        if not report.ok:
            raise CheckpointError(f"the audit log of run {run_id} does not verify: {report.line()}")
        entries = read_jsonl(audit_path)
        _check_run_start(entries, run_id, expected, signing_key)
        record = store.latest_checkpoint(run_id)
        if record is None:
            raise CheckpointError(f"run {run_id} has no recorded checkpoint to resume from")
        ckpt = read_checkpoint(record.path, expected_sha256=record.sha256)
        _check_checkpoint_in_chain(entries, ckpt, record, run_id, run.config_hash)
        replay = [
            e for e in entries
            if e["seq"] > int(ckpt.meta["audit_seq"]) and e["kind"] == "privacy_spend"
            and e["fields"].get("source") == SERVER_SOURCE and int(e["round"]) > ckpt.round
        ]
        audit = AuditLog(audit_path, run_id=run_id, signing_key=signing_key)
        attempt = store.start_attempt(run_id)
        run = store.get_run(run_id)
        cfg.runtime.output_dir = str(out)
        recorder = RunRecorder(out, resume=True)
        recorder.load_rows(ckpt.meta.get("rows", []))
        interrupted = list(range(ckpt.round + 1, max(run.last_round, ckpt.round) + 2))
        interrupted = [r for r in interrupted if r <= cfg.num_rounds]
        note = (
            "rounds after the checkpoint are trained again; clients' ledgers keep the privacy spend of any "
            "interrupted round they trained in (the update may have been seen), and the server's accountants "
            "book again every release logged after the checkpoint, so epsilon can exceed the uninterrupted "
            "run's by those rounds, never fall short of it"
        )
        if torn:
            audit.append("note", ckpt.round, attempt=attempt, torn_tail=torn,
                         note="an incomplete last line (a crash in the middle of an append) was set aside")
        audit.append(
            "resume", ckpt.round, attempt=attempt, from_round=ckpt.round, checkpoint_sha256=record.sha256,
            interrupted_rounds=interrupted, unrecorded_entries=max(0, audit.seq - run.audit_seq),
            server_releases_booked_again=[(e["round"], e["fields"].get("scope")) for e in replay], note=note,
        )
        audit.sign_head()
        store.add_events(
            run_id,
            [EventRecord(run_id, ckpt.round, "resume", f"attempt {attempt} from the checkpoint of round "
                         f"{ckpt.round}; interrupted round(s) {interrupted}: {note}",
                         {"attempt": attempt, "interrupted_rounds": interrupted}, time.time())],
            audit_head=audit.head, audit_seq=audit.seq,
        )
        log.warning(
            "run %s resumed (attempt %d) from the checkpoint of round %d; round(s) %s are trained again",
            run_id, attempt, ckpt.round, interrupted,
        )
        durable = cls(cfg, recorder, store, run, audit, checkpoint=ckpt)
        durable._lock, durable._replay = lock, replay
        return durable, recorder

    # ------------------------------------------------------------ round loop
    @property
    def start_round(self) -> int:
        """The last round already done (0 for a fresh run)."""
        return self.checkpoint.round if self.checkpoint else 0

    def restore(self, strategy: Strategy) -> list[np.ndarray] | None:
        """Load the checkpoint's strategy state and RNGs; its model (None for a fresh run)."""
        if self.checkpoint is None:
            return None
        if self.control is not None:  # the rule the checkpoint's strategy state was taken under
            self.control.restore_settings(self.checkpoint.meta.get("control"))
        load_strategy_state(strategy, self.checkpoint.state["strategy"])
        load_rng_state(self.checkpoint.state["rng"])
        for member in strategy_chain(strategy):
            if isinstance(member, FedAvgM):  # Flower's FedAvgM steps from its `initial_parameters`
                member.initial_parameters = ndarrays_to_parameters(self.checkpoint.model)
        accountants = [m for m in strategy_chain(strategy) if hasattr(m, "book_release")]
        for entry in self._replay:  # released before the crash, after the checkpoint: spent, whatever came next
            fields = entry["fields"]
            for member in accountants:
                member.book_release(str(fields["scope"]), float(fields["noise_multiplier"]))
        return self.checkpoint.model

    def round_started(self) -> None:
        self._round_started = time.time()

    def released(self, server_round: int) -> None:
        """Log the server accountants' spend of ``server_round`` before its model leaves the server.

        Called right after aggregation: the new model goes out in federated
        evaluation and in the next round's instructions, so a crash after this
        point has released it. A resume books these entries again (see ``_resume``).
        """
        items = self._server_spend(server_round, self.recorder.rows.get(server_round, {}))
        if items:
            self.audit.extend(items)
        self._released.add(server_round)

    def _server_spend(self, server_round: int, row: dict[str, Any]) -> list[tuple[str, int | None, dict[str, Any]]]:
        """One ``privacy_spend`` entry per server accountant that booked ``server_round`` (with its noise, for a replay)."""
        items: list[tuple[str, int | None, dict[str, Any]]] = []
        for scope, noise_keys in _SERVER_SPEND:
            if row.get(scope) is None:
                continue
            noise = next((row[k] for k in noise_keys if row.get(k) is not None), None)
            items.append(("privacy_spend", server_round, {
                "scope": scope, "epsilon": row[scope], "noise_multiplier": noise, "source": SERVER_SOURCE,
                "attempt": self.attempt,
            }))
        return items

    def round_done(self, server_round: int, model: list[np.ndarray], strategy: Strategy) -> None:
        """Audit, checkpoint and commit one finished round (see the module docstring for the order)."""
        started = time.perf_counter()
        if self.control is not None:  # operators' requests, settled before the round is recorded (their events go with it)
            self.control.at_boundary(server_round)
        lines = self._collect(server_round)
        updates = self._updates(server_round, lines)
        row = dict(self.recorder.rows.get(server_round, {"round": server_round}))
        aggregated = server_round > 0 and int(row.get("fit_clients", 0) or 0) > 0 and any(
            u.status == "accepted" for u in updates
        )
        if aggregated:
            self.trained_rounds += 1
        digest = model_digest(model)
        self.audit.extend(self._audit_items(server_round, lines, updates, row, digest, aggregated))
        stop = self.stop_request()
        paused = self.control is not None and self.control.paused
        ckpt_record = None
        if stop or paused or server_round % self.cfg.store.checkpoint_every == 0 or server_round == self.cfg.num_rounds:
            ckpt_record = self._checkpoint(server_round, model, strategy)
        self.audit.sign_head()
        participants = sorted({u.client for u in updates})
        record = RoundRecord(
            run_id=self.run.run_id, round=server_round, attempt=self.attempt, metrics=row,
            started_at=self._round_started, ended_at=time.time(), participants=participants,
            bytes_up=int(row.get("upload_round_bytes", 0) or 0), bytes_down=int(row.get("download_round_bytes", 0) or 0),
        )
        events = [
            EventRecord(self.run.run_id, server_round, e["kind"], e.get("reason", ""),
                        {k: v for k, v in e.items() if k not in ("line", "kind", "reason", "round", "time")},
                        float(e.get("time", time.time())))
            for e in lines.events
        ]
        committed = self.store.commit_round(
            self.run.run_id, record, updates, events, ckpt_record, audit_head=self.audit.head, audit_seq=self.audit.seq
        )
        if ckpt_record is not None and committed:  # only once the store knows the new one: a crash before leaves the old one usable
            prune_checkpoints(self.checkpoint_dir, self.cfg.store.keep_checkpoints, protect=Path(ckpt_record.path))
        self.overhead_s[server_round] = time.perf_counter() - started
        if paused and not stop and server_round < self.cfg.num_rounds:
            assert self.control is not None
            self.control.wait_while_paused(
                server_round, lambda: self._record_between_rounds(server_round),
                stop_file=lambda: (self.output_dir / STOP_FILE).exists(),
            )
            stop = self.stop_request()
        if stop and server_round < self.cfg.num_rounds:
            self.stopping = stop

    def _record_between_rounds(self, server_round: int) -> None:
        """Audit and store the events of requests settled while the run is paused (no round to carry them)."""
        lines = self._collect(server_round)
        items = [item for item in self._audit_items(server_round, lines, [], {}, "", False) if item[0] != "aggregation"]
        self.audit.extend(items)
        self.audit.sign_head()
        events = [
            EventRecord(self.run.run_id, server_round, e["kind"], e.get("reason", ""),
                        {k: v for k, v in e.items() if k not in ("line", "kind", "reason", "round", "time")},
                        float(e.get("time", time.time())))
            for e in lines.events
        ]
        self.store.add_events(self.run.run_id, events, audit_head=self.audit.head, audit_seq=self.audit.seq)

    def stop_request(self) -> dict[str, Any] | None:
        """The operator's request to stop (the API, or ``fedapp runs stop``'s file in the output folder), if any."""
        if self.control is not None and self.control.stop_requested is not None:
            return dict(self.control.stop_requested)
        path = self.output_dir / STOP_FILE
        if not path.exists():
            return None
        try:
            request = json.loads(path.read_text())
        except (OSError, ValueError):
            request = {}
        return {"by": str(request.get("by", "unknown")), "reason": str(request.get("reason", "")),
                "requested_at": request.get("time")}

    def stop(self) -> None:
        """End this attempt at the checkpoint just taken: an admin action in the chain, status interrupted."""
        request = self.stopping or {}
        if self.control is None or self.control.stop_requested is None:  # the API's stop is in the chain already
            self.audit.append("admin_action", None, action="stop", attempt=self.attempt, **request)
        path = self.output_dir / STOP_FILE
        if path.exists():
            path.replace(self.output_dir / f"{STOP_FILE}.done-{int(time.time())}")
        self.finish("interrupted", error=f"stopped by {request.get('by', 'an operator')}: {request.get('reason') or 'no reason given'}")

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the end of the run (completed / failed) in the audit log and the store."""
        if status == "completed" and self.trained_rounds == 0:
            status, error = "failed", "no round aggregated any client update: the run trained nothing"
        self.audit.append("run_end", None, status=status, error=error, trained_rounds=self.trained_rounds)
        self.audit.sign_head()
        overhead = EventRecord(
            self.run.run_id, max(self.overhead_s, default=0), "store_overhead",
            "seconds spent at each round boundary of this attempt (audit entries, checkpoint, store commit)",
            {"attempt": self.attempt, "seconds": {str(r): round(t, 6) for r, t in self.overhead_s.items()}}, time.time(),
        )
        self.store.add_events(self.run.run_id, [overhead])
        self.store.finish_run(self.run.run_id, status, error=error, audit_head=self.audit.head, audit_seq=self.audit.seq)
        self.store.close()
        self.status, self.error = status, error
        release_run_lock(self._lock)
        self._lock = None

    # -------------------------------------------------------------- helpers
    def _collect(self, server_round: int) -> _RoundLines:
        lines = _RoundLines()
        for line in self.recorder.drain():
            kind = line.get("line")
            if kind == "client":
                lines.clients.append(line)
            elif kind == "score":
                lines.scores[str(line.get("client"))] = line
            else:
                lines.events.append(line)
        return lines

    def _updates(self, server_round: int, lines: _RoundLines) -> list[ClientUpdateRecord]:
        by_client: dict[str, ClientUpdateRecord] = {}
        for c in lines.clients:
            client = str(c["client"])
            declined = _int_or_none(c.get("declined")) == 1
            score = lines.scores.get(client, {})
            by_client[client] = ClientUpdateRecord(
                run_id=self.run.run_id, round=server_round, attempt=self.attempt, client=client,
                status="declined" if declined else "accepted",
                reason=str(c.get("reason", "")) if declined else "",
                num_examples=_int_or_none(c.get("num_examples")),
                update_norm=_float_or_none(c.get("update_norm", score.get("norm"))),
                anomaly_score=_float_or_none(score.get("anomaly")),
                epsilon=_float_or_none(c.get("epsilon")),
                reputation=_float_or_none(score.get("reputation")),
            )
        for e in lines.events:
            mapped = _EVENT_MAP.get(str(e.get("kind")))
            client = e.get("client")
            if mapped is None or mapped[1] is None or client is None or str(client) not in by_client:
                continue
            u = by_client[str(client)]
            u.status, u.reason = mapped[1], str(e.get("reason", ""))
        return [by_client[k] for k in sorted(by_client)]

    def _audit_items(
        self, server_round: int, lines: _RoundLines, updates: list[ClientUpdateRecord], row: dict[str, Any],
        digest: str, aggregated: bool,
    ) -> list[tuple[str, int | None, dict[str, Any]]]:
        items: list[tuple[str, int | None, dict[str, Any]]] = []
        for u in updates:
            if u.client not in self.seen_clients:
                self.seen_clients.add(u.client)
                items.append(("client_joined", server_round, {"client": u.client, "attempt": self.attempt}))
            if u.status == "declined":
                items.append(("client_declined", server_round, {"client": u.client, "reason": u.reason, "attempt": self.attempt}))
            if u.epsilon is not None:
                items.append(("privacy_spend", server_round, {
                    "client": u.client, "epsilon": u.epsilon, "source": "client ledger", "attempt": self.attempt}))
        for e in lines.events:
            mapped = _EVENT_MAP.get(str(e.get("kind")))
            if mapped is not None:
                fields = {k: v for k, v in e.items() if k not in ("line", "kind", "round", "time")}
                items.append((mapped[0], server_round, {"event": e["kind"], **fields, "attempt": self.attempt}))
        if server_round not in self._released:  # a caller that skipped released(): log the spend now
            items += self._server_spend(server_round, row)
        items.append((
            "aggregation", server_round,
            {
                "participants": [u.client for u in updates if u.status == "accepted"],
                "aggregated": aggregated, "model_sha256": digest, "attempt": self.attempt,
                "test_accuracy": row.get("test_accuracy"),
            },
        ))
        return items

    def _checkpoint(self, server_round: int, model: list[np.ndarray], strategy: Strategy) -> CheckpointRecord:
        meta = {
            "run_id": self.run.run_id, "config_hash": self.run.config_hash, "attempt": self.attempt,
            "audit_head": self.audit.head, "audit_seq": self.audit.seq, "rows": self.recorder.table(),
            "seen_clients": sorted(self.seen_clients), "trained_rounds": self.trained_rounds,
            "control": self.control.saved_settings() if self.control is not None else None,
        }
        state = {"strategy": strategy_state(strategy), "rng": rng_state()}
        path = self.checkpoint_dir / checkpoint_name(server_round)
        written = write_checkpoint(path, server_round=server_round, model=model, state=state, meta=meta)
        record = CheckpointRecord(
            run_id=self.run.run_id, round=server_round, path=str(written.path), sha256=written.sha256,
            size_bytes=written.size_bytes, write_s=written.write_s, audit_head=self.audit.head,
            audit_seq=self.audit.seq, created_at=time.time(),
        )
        self.audit.append(
            "checkpoint", server_round, path=os.path.relpath(written.path, self.output_dir), sha256=written.sha256,
            size_bytes=written.size_bytes, audit_head=record.audit_head, audit_seq=record.audit_seq,
        )
        return record


def _int_or_none(value: Any) -> int | None:
    """A client-reported count, or None when absent or not a number (a client cannot crash the round)."""
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def hold_run_lock(output_dir: Path, run_id: str) -> Any:
    """An exclusive lock on ``<output>/run.lock`` for the life of this attempt.

    Two processes writing one run would interleave audit entries and commit each
    other's rounds; the kernel drops the lock when its holder dies (even by
    SIGKILL), so a crashed run can be resumed at once.
    """
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until finish()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"run {run_id} is being written by another live process (lock held on {output_dir / LOCK_FILE}); "
            "stop it first"
        ) from None
    return handle


def release_run_lock(handle: Any) -> None:
    if handle is not None:
        handle.close()


def set_aside_torn_tail(path: Path, *, recorded_seq: int) -> dict[str, Any] | None:
    """Move an incomplete last line (a crash mid-append) out of the log, if it lies past the recorded head.

    The bytes go to ``audit.jsonl.torn-<sha256>`` and the resumed chain notes
    their length and hash, so nothing is silently dropped; a torn line *before*
    the recorded head is left for verification to refuse (that is tampering).
    """
    if not path.exists():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    if data[:cut].count(b"\n") < recorded_seq:
        return None
    torn = data[cut:]
    digest = hashlib.sha256(torn).hexdigest()
    side = path.with_name(f"{path.name}.torn-{digest[:16]}")
    side.write_bytes(torn)
    with open(path, "r+b") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("audit log %s ended in an incomplete line (%d bytes); set aside in %s", path, len(torn), side)
    return {"bytes": len(torn), "sha256": digest, "file": side.name}


def _require_ledgers(cfg: ExperimentConfig) -> None:
    """Client epsilon lives in the clients' ledgers; without a ledger folder a resumed run would start them at 0."""
    client = cfg.privacy.client
    if client.enabled and not client.ledger_dir:
        raise ConfigError(
            "resuming a run with client DP needs privacy.client.ledger_dir (the SuperNodes' pinned ledger-dir in "
            "processes mode): without it the clients' ledgers died with the first attempt and their epsilon would "
            "restart at 0"
        )


def _check_run_start(entries: list[dict[str, Any]], run_id: str, config_hash: str, signing_key: Any) -> None:
    """The verified chain's first entry must name this config and, if it was signed, this key."""
    if not entries or entries[0].get("kind") != "run_start":
        raise CheckpointError(f"the audit log of run {run_id} does not start with run_start")
    fields = entries[0]["fields"]
    if fields.get("config_hash") != config_hash:
        raise CheckpointError(
            f"the audit log of run {run_id} started with config {str(fields.get('config_hash'))[:12]}, the store says "
            f"{config_hash[:12]}: the store's record was changed"
        )
    if fields.get("signed"):
        if signing_key is None:
            raise CheckpointError(
                f"run {run_id} was signed with audit key {fields.get('audit_key')}; resume it with store.audit_key "
                "set to that key (an unsigned attempt would break the chain's guarantee)"
            )
        if fields.get("audit_key") != key_fingerprint(signing_key.public_key()):
            raise CheckpointError(
                f"run {run_id} was signed with audit key {fields.get('audit_key')}, store.audit_key is "
                f"{key_fingerprint(signing_key.public_key())}"
            )


def _check_checkpoint_in_chain(
    entries: list[dict[str, Any]], ckpt: Checkpoint, record: CheckpointRecord, run_id: str, config_hash: str
) -> None:
    """The checkpoint must be one the chain recorded (same round and SHA-256) and carry a head of the chain."""
    if ckpt.meta.get("run_id") != run_id or ckpt.meta.get("config_hash") != config_hash:
        raise CheckpointError(
            f"checkpoint {record.path} belongs to run {ckpt.meta.get('run_id')!r} with config "
            f"{str(ckpt.meta.get('config_hash'))[:12]}, not to run {run_id} ({config_hash[:12]})"
        )
    named = any(
        e["kind"] == "checkpoint" and e["round"] == ckpt.round and e["fields"].get("sha256") == record.sha256
        for e in entries
    )
    if not named or ckpt.round != record.round:
        raise CheckpointError(
            f"checkpoint {record.path} (round {ckpt.round}, SHA-256 {record.sha256[:16]}...) is not one the audit "
            "chain recorded: refusing to resume from it"
        )
    seq, head = int(ckpt.meta.get("audit_seq", -1)), ckpt.meta.get("audit_head")
    if not 1 <= seq <= len(entries) or entries[seq - 1]["hash"] != head:
        raise CheckpointError(f"checkpoint {record.path} carries an audit head that is not in the chain")


__all__ = ["DurableRun", "StoreError", "new_run_id", "AUDIT_FILE", "CHECKPOINT_DIR"]
