"""What the API answers: the run store's records turned into the v1 JSON shapes (docs/control_plane.md).

Reads go through a short-lived cache (:class:`TTLCache`). Why: fifty dashboards
polling every second would otherwise run the same queries fifty times a second
on the database the training run commits to, and a run's record only changes at
round boundaries (tens of seconds apart); one second of staleness is invisible on
a page that refreshes every two. Actions are never cached (an operator must see
their own request); tokens are re-checked against the store after one second
(:class:`fedapp.api.auth.TokenVerifier`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.control.actions import Settings, settings_after
from fedapp.store.db import RunStore, effective_rounds
from fedapp.strategies import clients_per_round
from fedapp.store.records import ActionRecord, ClientUpdateRecord, RoundRecord, RunRecord

_T = TypeVar("_T")

# event kind -> the status it leaves a client in (None: the status is not changed)
_STATUS_EVENTS = {
    "client_excluded": "excluded",
    "client_quarantined": "quarantined",
    "client_released": "active",
}
_REFUSED = ("refused", "quarantined")


class TTLCache:
    """``get(key, compute)``: the value computed at most ``ttl_s`` ago, else a fresh one (thread-safe)."""

    def __init__(self, ttl_s: float, max_entries: int = 2048) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._values: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def peek(self, key: Any) -> Any:
        """The fresh value under ``key``, or None (never computes: safe on the event loop)."""
        hit = self._values.get(key)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def get(self, key: Any, compute: Callable[[], _T]) -> _T:
        now = time.monotonic()
        with self._lock:
            hit = self._values.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            if len(self._values) >= self.max_entries:
                self._values = {k: v for k, v in self._values.items() if v[0] > now}
                if len(self._values) >= self.max_entries:  # a flood of distinct keys: start over
                    self._values.clear()
            self._values[key] = (now + self.ttl_s, value)
        return value


def json_bytes(value: Any) -> bytes:
    """Compact JSON; a non-finite float that slipped through becomes the store's string for it, never invalid JSON."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        from fedapp.store.schema import _json_safe

        return json.dumps(_json_safe(value), separators=(",", ":"), allow_nan=False).encode()


def finite(value: Any) -> float | None:
    """A number for JSON, or None (the store keeps non-finite floats as strings; JSON has no NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_config(run: RunRecord) -> ExperimentConfig | None:
    """The run's configuration, or None when this fedapp cannot read it (a run of another version)."""
    try:
        return ExperimentConfig.from_dict(run.config)
    except (ConfigError, TypeError, ValueError):
        return None


def epsilon_budget(cfg: ExperimentConfig | None) -> float | None:
    """Where a client stops spending: ``epsilon_budget``, else ``target_epsilon``; None without client DP."""
    if cfg is None or not cfg.privacy.client.enabled:
        return None
    client = cfg.privacy.client
    budget = client.epsilon_budget or client.target_epsilon
    return float(budget) if budget > 0 else None


def lineage_updates(updates: list[ClientUpdateRecord], rounds: list[RoundRecord]) -> list[ClientUpdateRecord]:
    """The updates of the rounds the run's model descends from (a resumed run's abandoned rounds left out)."""
    kept = {(r.round, r.attempt) for r in effective_rounds(rounds)}
    return [u for u in updates if (u.round, u.attempt) in kept or u.round == 0]


class RunViews:
    """The v1 read models over one :class:`RunStore`; see the module docstring."""

    def __init__(self, store: RunStore, *, cache_s: float = 1.0) -> None:
        self.store = store
        self.cache = TTLCache(cache_s)

    # ------------------------------------------------------------------ runs
    def runs(self, limit: int) -> dict[str, Any]:
        return self.cache.get(("runs", limit), lambda: {"runs": [self._summary(r) for r in self.store.list_runs(limit)]})

    def run(self, run_id: str) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            record = self.store.get_run(run_id)
            return {**self._summary(record), "config": record.config}

        return self.cache.get(("run", run_id), compute)

    def _summary(self, run: RunRecord) -> dict[str, Any]:
        cfg = run_config(run)
        applied = [a for a in self.store.actions(run.run_id) if a.status == "applied"]
        settings = self.settings(cfg, applied) if cfg else Settings(rule=str(run.config.get("strategy", {}).get("name")))
        rounds = effective_rounds(self.store.rounds(run.run_id))
        last = rounds[-1].metrics if rounds else {}
        client_eps = [finite(m.get("epsilon_max", m.get("epsilon"))) for m in (r.metrics for r in rounds)]
        client_eps = [e for e in client_eps if e is not None]
        return {
            "run_id": run.run_id, "name": run.name, "status": run.status,
            "paused": run.status == "running" and _paused(applied),
            "started_at": run.started_at, "ended_at": run.ended_at, "last_round": run.last_round,
            "num_rounds": int(run.config.get("num_rounds", 0) or 0), "attempt": run.attempt, "error": run.error,
            "config_hash": run.config_hash, "code_version": run.code_version,
            "strategy": settings.rule,
            "secagg": cfg.secagg.method if cfg else None,
            "clients_per_round": _clients_per_round(cfg, settings),
            "num_clients": cfg.partition.num_clients if cfg else None,
            "privacy": {
                "client_dp": bool(cfg and cfg.privacy.client.enabled),
                "central_dp": bool(cfg and cfg.privacy.central.enabled),
                "distributed_dp": bool(cfg and cfg.secagg.noise_sigma_total > 0),
                "epsilon_budget": epsilon_budget(cfg),
                "delta": _delta(cfg),
            },
            "latest": {
                "round": rounds[-1].round if rounds else None,
                "test_accuracy": finite(last.get("test_accuracy")),
                "test_loss": finite(last.get("test_loss")),
                "max_client_epsilon": max(client_eps) if client_eps else None,
            },
        }

    @staticmethod
    def settings(cfg: ExperimentConfig, applied: list[ActionRecord]) -> Settings:
        """The rule and clients per round in force after the applied actions."""
        return settings_after(cfg, [(a.action, a.params) for a in applied])

    # ---------------------------------------------------------------- rounds
    def rounds(self, run_id: str) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            rounds = self.store.rounds(run_id, effective_only=True)
            return {"run_id": run_id, "rounds": [
                {"round": r.round, "attempt": r.attempt, "started_at": r.started_at, "ended_at": r.ended_at,
                 "duration_s": r.duration_s, "participants": r.participants,
                 "metrics": {k: (finite(v) if isinstance(v, float | str) and _numeric_key(v) else v)
                             for k, v in r.metrics.items()}}
                for r in rounds
            ]}

        return self.cache.get(("rounds", run_id), compute)

    # --------------------------------------------------------------- clients
    def clients(self, run_id: str) -> dict[str, Any]:
        return self.cache.get(("clients", run_id), lambda: self._clients(run_id))

    def _clients(self, run_id: str) -> dict[str, Any]:
        data = self.store.export(run_id)
        run = RunRecord(**data["run"])
        budget = epsilon_budget(run_config(run))
        rounds = [RoundRecord(**r) for r in data["rounds"]]
        every = [ClientUpdateRecord(**u) for u in data["updates"]]
        updates = lineage_updates(every, rounds)
        clients: dict[str, dict[str, Any]] = {}

        def entry(label: str) -> dict[str, Any]:
            return clients.setdefault(label, {
                "client": label, "status": "active", "status_reason": "", "rounds_participated": 0, "last_round": 0,
                "last_update_status": None, "reputation": None, "anomaly_score": None, "epsilon": None,
                "epsilon_budget": budget, "budget_left": None, "refusal_count": 0, "failures": 0, "refusals": [],
            })

        for u in updates:
            c = entry(u.client)
            c["last_round"] = max(c["last_round"], u.round)
            c["last_update_status"] = u.status
            c["rounds_participated"] += u.status == "accepted"
            for key, value in (("reputation", u.reputation), ("anomaly_score", u.anomaly_score)):
                if finite(value) is not None:
                    c[key] = finite(value)
            if u.status in _REFUSED:
                c["refusal_count"] += 1
                c["refusals"].append({"round": u.round, "status": u.status, "reason": u.reason})
        for u in every:  # spent is spent: an abandoned attempt's rounds were trained (ledgers are cumulative)
            if finite(u.epsilon) is not None:
                c = entry(u.client)
                c["epsilon"] = max(c["epsilon"] or 0.0, finite(u.epsilon) or 0.0)
        for e in data["events"]:
            label = e["fields"].get("client")
            kind = e["kind"]
            if kind == "admin_action" and e["fields"].get("status") == "applied":
                action, params = e["fields"].get("action"), e["fields"].get("params") or {}
                if action in ("block", "unblock") and params.get("client"):
                    c = entry(str(params["client"]))
                    c["status"] = "blocked" if action == "block" else "active"
                    why = e["fields"].get("operator_reason")
                    c["status_reason"] = f"{e['reason']} (by {e['fields'].get('requested_by')}{': ' + why if why else ''})"
                continue
            if label is None:
                continue
            if kind == "client_failure":
                entry(str(label))["failures"] += 1
            status = _STATUS_EVENTS.get(kind)
            if status is not None:
                c = entry(str(label))
                if c["status"] != "blocked":  # an operator's block outranks the other exclusions
                    c["status"], c["status_reason"] = status, e["reason"]
        for c in clients.values():
            c["refusals"] = c["refusals"][-20:]
            if budget is not None and c["epsilon"] is not None:
                c["budget_left"] = max(0.0, budget - c["epsilon"])
        last = max((r.round for r in rounds), default=0)
        return {"run_id": run_id, "round": last, "clients": sorted(clients.values(), key=lambda c: _label_key(c["client"]))}

    # --------------------------------------------------------------- privacy
    def privacy(self, run_id: str) -> dict[str, Any]:
        return self.cache.get(("privacy", run_id), lambda: self._privacy(run_id))

    def _privacy(self, run_id: str) -> dict[str, Any]:
        data = self.store.export(run_id)
        run = RunRecord(**data["run"])
        cfg = run_config(run)
        rounds = effective_rounds([RoundRecord(**r) for r in data["rounds"]])
        updates = lineage_updates([ClientUpdateRecord(**u) for u in data["updates"]], rounds)
        per_client: dict[str, list[dict[str, Any]]] = {}
        for u in updates:
            eps = finite(u.epsilon)
            if eps is not None:
                per_client.setdefault(u.client, []).append({"round": u.round, "epsilon": eps})
        series = {
            key: [{"round": r.round, "epsilon": finite(r.metrics.get(key))} for r in rounds
                  if finite(r.metrics.get(key)) is not None]
            for key in ("central_epsilon", "released_epsilon")
        }
        exhausted = [
            {"client": e["fields"].get("client"), "round": e["round"], "reason": e["reason"]}
            for e in data["events"]
            if e["kind"] == "client_excluded" and e["fields"].get("reason_code") == "privacy_budget"
        ]
        top = [e for e in (finite(u["epsilon"]) for u in data["updates"]) if e is not None]  # every attempt's spend
        return {
            "run_id": run_id, "delta": _delta(cfg), "epsilon_budget": epsilon_budget(cfg),
            "clients": {k: per_client[k] for k in sorted(per_client, key=_label_key)},
            "central": series["central_epsilon"], "distributed": series["released_epsilon"],
            "max_client_epsilon": max(top) if top else None, "exhausted": exhausted,
        }

    # ---------------------------------------------------------------- events
    def events(self, run_id: str, after: int, limit: int) -> dict[str, Any]:
        def compute() -> list[dict[str, Any]]:
            return [{"id": i, **asdict(e)} for i, e in enumerate(self.store.events(run_id), start=1)]

        everything = self.cache.get(("events", run_id), compute)
        picked = [e for e in everything if e["id"] > after]
        return {"run_id": run_id, "events": picked[-limit:] if after == 0 else picked[:limit]}

    # ----------------------------------------------------------------- audit
    def audit(self, run_id: str, public_key: Any = None) -> dict[str, Any]:
        return self.cache.get(("audit", run_id), lambda: audit_status(self.store.get_run(run_id), public_key))


def audit_status(run: RunRecord, public_key: Any = None) -> dict[str, Any]:
    """The run's audit chain checked against the head the store recorded (and the pinned key, if given)."""
    from fedapp.store.audit import verify_log
    from fedapp.store.durable import AUDIT_FILE

    path = Path(run.output_dir) / AUDIT_FILE
    if not path.exists():
        return {"ok": False, "line": f"no audit log at {path} (moved, deleted, or on another machine)",
                "entries": 0, "signed": False, "checked_signature": public_key is not None, "head": ""}
    report = verify_log(path, expected_head=(run.audit_seq, run.audit_head) if run.audit_seq else None,
                        public_key=public_key, run_id=run.run_id)
    return {"ok": report.ok, "line": report.line(), "entries": report.entries, "signed": report.signed,
            "checked_signature": public_key is not None, "head": report.head}


def _paused(applied: list[ActionRecord]) -> bool:
    last = next((a.action for a in reversed(applied) if a.action in ("pause", "resume")), None)
    return last == "pause"


def _clients_per_round(cfg: ExperimentConfig | None, settings: Settings) -> int | None:
    if cfg is None:
        return None
    if settings.clients_per_round is not None:
        return settings.clients_per_round
    return min(cfg.partition.num_clients, clients_per_round(cfg))


def _delta(cfg: ExperimentConfig | None) -> float | None:
    if cfg is None:
        return None
    if cfg.privacy.client.enabled:
        return cfg.privacy.client.delta
    if cfg.privacy.central.enabled:
        return cfg.privacy.central.delta
    if cfg.secagg.noise_sigma_total > 0:
        return cfg.secagg.noise_delta
    return None


def _numeric_key(value: Any) -> bool:
    """A float, or one of the strings the store writes for non-finite floats."""
    return isinstance(value, float) or value in ("NaN", "Infinity", "-Infinity")


def _label_key(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() and len(label) < 18 else (1, 0, label)
