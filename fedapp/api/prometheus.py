"""``GET /metrics``: the run store's latest runs in Prometheus' text format.

Why a collector over the store and not metrics updated by the runs: the runs
are other processes (a simulation, a SuperLink's ServerApp) on other machines,
and the store is the one place they all write. So each scrape reads the store
and the exposition is built on a fresh :class:`CollectorRegistry`: no global
registry, no state in this process, nothing to reset between tests or apps.

Cost of a scrape: one ``list_runs(max_runs)``, then three reads per run (its
rounds of every attempt, its client updates, its applied actions), finished
runs included (their last values are what a dashboard compares). The client
updates are the bulk -- ``fedapp_epsilon_max`` is a max over all of them, and
the store has no aggregate query. Measured on two busy cores (SQLite): 20
runs of 20 rounds x 10 clients, 0.1-0.3 s; 20 runs of 100 rounds x 50 clients
(100,000 updates), 2-3 s. Nothing is cached here: the API caches the body.

Every per-run sample is labelled ``run_id`` and ``name``. Values come from the
run's effective rounds (the lineage of its latest model,
:func:`fedapp.store.db.effective_rounds`):

* per-round counts and the round's duration are those of the last effective
  round after round 0 (round 0 evaluates the initial model; nobody trains);
* ``fedapp_test_accuracy``, ``fedapp_test_loss`` and ``fedapp_central_epsilon``
  are the newest *measured* value (with ``runtime.eval_every`` > 1 the last
  round may not have been evaluated, and a gauge should not vanish every other
  round);
* a value that is absent, not a number, or not finite (NaN, inf, the string
  "NaN") is left out rather than exported as NaN: one NaN series turns every
  ``max``/``avg`` over runs into NaN, and "not measured" is what it means.

Label values (run names, strategies) come from whoever started a run;
prometheus_client escapes backslashes, quotes and newlines in them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedapp.store.db import RunStore, effective_rounds
from fedapp.store.records import ClientUpdateRecord, RoundRecord, RunRecord

# The text format every Prometheus reads. Pinned rather than prometheus_client's CONTENT_TYPE_LATEST,
# which names format 1.0.0 from 0.22 on; for metric names like ours the two bodies are the same.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_LABELS = ("run_id", "name")

# name -> help; every family is a gauge labelled RUN_LABELS, except fedapp_run_info (more labels)
# and fedapp_rounds (a counter, exposed as fedapp_rounds_total)
GAUGES = {
    "fedapp_run_running": "1 while the run is running, else 0.",
    "fedapp_round": "Last round committed to the store (0: only the initial model was evaluated).",
    "fedapp_rounds_planned": "Rounds the run is configured for (num_rounds).",
    "fedapp_test_accuracy": "Newest central test accuracy of the global model (fraction 0-1).",
    "fedapp_test_loss": "Newest central test loss of the global model.",
    "fedapp_clients_sampled": "Clients sampled in the last round.",
    "fedapp_clients_trained": "Clients whose update arrived in the last round.",
    "fedapp_clients_refused": "Client updates refused by the server's checks in the last round.",
    "fedapp_clients_quarantined": "Clients quarantined by anomaly detection as of the last round.",
    "fedapp_client_failures": "Clients that failed in the last round (crash, timeout, lost node, ...).",
    "fedapp_epsilon_max": "Largest record-level DP epsilon any client reported in the run (all attempts).",
    "fedapp_central_epsilon": "Newest user-level epsilon spent by central or distributed DP.",
    "fedapp_round_seconds": "Wall time of the last round, from its start to its commit to the store.",
}
INFO_HELP = "Run metadata as labels; the value is always 1. strategy: the aggregation rule in force."
ROUNDS_TOTAL_HELP = "Rounds committed to the store, all attempts (a round trained again after a resume counts again)."


def render_metrics(store: RunStore, *, max_runs: int = 20) -> tuple[bytes, str]:
    """The exposition body for the ``max_runs`` newest runs and its content type (text format 0.0.4).

    Store errors propagate (:class:`fedapp.store.StoreError`): the API answers
    them, a scrape that silently shows no runs would hide an outage.
    """
    if max_runs < 0:
        raise ValueError(f"max_runs must be >= 0, not {max_runs}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunStoreCollector(store, max_runs=max_runs))
    return generate_latest(registry), CONTENT_TYPE


class RunStoreCollector(Collector):
    """Reads the store on every :meth:`collect`; see the module docstring for what it exports."""

    def __init__(self, store: RunStore, *, max_runs: int = 20) -> None:
        self.store = store
        self.max_runs = max_runs

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("fedapp_run_info", INFO_HELP, labels=(*RUN_LABELS, "status", "strategy"))
        gauges = {name: GaugeMetricFamily(name, text, labels=RUN_LABELS) for name, text in GAUGES.items()}
        rounds_total = CounterMetricFamily("fedapp_rounds", ROUNDS_TOTAL_HELP, labels=RUN_LABELS)
        for run in self.store.list_runs(limit=self.max_runs):
            labels = [run.run_id, run.name]
            values = self._run_values(run)
            info.add_metric([*labels, run.status, str(values.pop("strategy"))], 1.0)
            rounds_total.add_metric(labels, float(values.pop("rounds_total")))
            for name, value in values.items():
                if value is not None:
                    gauges[name].add_metric(labels, value)
        yield info
        yield from gauges.values()
        yield rounds_total

    def _run_values(self, run: RunRecord) -> dict[str, Any]:
        """One run's values by family name (None: no sample), plus ``strategy`` and ``rounds_total``."""
        all_rounds = self.store.rounds(run.run_id)
        effective = effective_rounds(all_rounds) if all_rounds else []
        trained = [r for r in effective if r.round > 0]
        last = trained[-1] if trained else None
        metrics = last.metrics if last else {}
        updates = self.store.updates(run.run_id)
        in_last = [u for u in updates if last is not None and (u.round, u.attempt) == (last.round, last.attempt)]
        return {
            "strategy": self._strategy(run),
            "rounds_total": sum(1 for r in all_rounds if r.round > 0),
            "fedapp_run_running": 1.0 if run.status == "running" else 0.0,
            "fedapp_round": float(run.last_round),
            "fedapp_rounds_planned": number(run.config.get("num_rounds")),
            "fedapp_test_accuracy": newest(effective, "test_accuracy"),
            "fedapp_test_loss": newest(effective, "test_loss"),
            "fedapp_clients_sampled": number(metrics.get("fit_sampled")),
            "fedapp_clients_trained": number(metrics.get("fit_trained")),
            "fedapp_clients_refused": float(_count(in_last, "refused")) if last else None,
            "fedapp_clients_quarantined": _quarantined(metrics, in_last) if last else None,
            "fedapp_client_failures": number(metrics.get("fit_failures")),
            "fedapp_epsilon_max": max_epsilon(updates),
            "fedapp_central_epsilon": newest(effective, "central_epsilon"),
            "fedapp_round_seconds": number(last.duration_s) if last else None,
        }

    def _strategy(self, run: RunRecord) -> str:
        """The rule in force: the last applied ``set_rule`` action's, else the config's (as the API's RunSummary)."""
        rule = ""
        for action in self.store.actions(run.run_id, status="applied"):
            if action.action == "set_rule":
                rule = str(action.params.get("rule", ""))
        if rule:
            return rule
        strategy = run.config.get("strategy")
        return str(strategy.get("name", "")) if isinstance(strategy, dict) else ""


def number(value: Any) -> float | None:
    """``value`` as a finite float; None for absent, booleans, non-numeric and non-finite values (NaN, "inf")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def newest(rounds: Iterable[RoundRecord], key: str) -> float | None:
    """The value of ``key`` in the last of ``rounds`` where it is a finite number."""
    found = None
    for record in rounds:
        value = number(record.metrics.get(key))
        if value is not None:
            found = value
    return found


def max_epsilon(updates: Iterable[ClientUpdateRecord]) -> float | None:
    """The largest finite client epsilon among ``updates`` (None when no update reported one)."""
    epsilons = [e for e in (number(u.epsilon) for u in updates) if e is not None]
    return max(epsilons) if epsilons else None


def _count(updates: Iterable[ClientUpdateRecord], status: str) -> int:
    return sum(1 for u in updates if u.status == status)


def _quarantined(metrics: dict[str, Any], in_last: list[ClientUpdateRecord]) -> float:
    """The detector's count of quarantined clients (round key ``quarantined``), else the round's quarantined updates."""
    counted = number(metrics.get("quarantined"))
    return counted if counted is not None else float(_count(in_last, "quarantined"))
