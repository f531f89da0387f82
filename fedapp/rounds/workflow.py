"""The fit step of a round with a deadline, live progress, bounded waiting for nodes and failure accounting.

Flower's ``default_fit_workflow`` waits for every reply with no deadline (the
``round_timeout`` of ``ServerConfig`` only reaches the legacy ``start_server``),
reports nothing until the round ends, and passes the strategy ``Exception(Error)``
failures that name no client. :class:`FitRound` keeps its shape -- the
strategy's ``configure_fit``, one TRAIN message per sampled node, ``aggregate_fit``
-- and changes what happens in between:

* messages go out with :meth:`Grid.push_messages` and replies are pulled until
  all have arrived or ``strategy.round_timeout_s`` has passed; each reply is
  reported as it arrives (:class:`~fedapp.rounds.progress.RoundProgress`);
* every sampled client gets an :class:`~fedapp.rounds.outcomes.Outcome`; the ones
  without an update reach the strategy as :class:`ClientFailure` (client, outcome,
  one-line reason) and are recorded as ``client_failure`` events;
* before sampling, too few connected nodes make the server wait up to
  ``strategy.node_wait_s``, saying so every minute, instead of blocking in
  ``ClientManager.sample`` for a day;
* after aggregation a model that is no longer finite, or more failed rounds than
  ``strategy.max_failed_rounds``, stop the run with :class:`RunFailed`.

With SecAgg+ the fit step is Flower's ``SecAggPlusWorkflow`` (its stages, its
timeout); :class:`FitRound` runs it as ``inner`` and accounts for what the
strategy was handed.
"""

from __future__ import annotations

import time
from logging import DEBUG, INFO, WARNING
from typing import Callable, cast

import numpy as np
from flwr.common import Code, FitRes, Message, MessageType, log, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedapp.config import ExperimentConfig
from fedapp.metrics import RunRecorder
from fedapp.rounds.outcomes import LABEL, ClientFailure, Outcome, RoundTally, RunFailed, classify_error, one_line, tagged
from fedapp.rounds.progress import RoundProgress, round_summary
from fedapp.wrappers import CLIENT_ID_KEY

PULL_INTERVAL_S = 0.2
TTL_MARGIN_S = 30.0  # an instruction outlives the round deadline by this much, then expires
WAIT_REPORT_S = 60.0

def node_key(node: int | str) -> str:
    """The tally's key for a node: assigned by the SuperLink, not claimed by the client."""
    return f"node-{node}"


def training_ended(strategy: object) -> bool:
    """Whether the strategy's client exclusion has ended training (too few clients may still train)."""
    from fedapp.exclusion import ClientExclusion
    from fedapp.store.state import strategy_chain

    return any(isinstance(m, ClientExclusion) and m.ended_in_round is not None for m in strategy_chain(strategy))


# recorder events by which the strategy's wrappers say what became of a reply
REFUSAL_EVENTS = frozenset({"update_rejected", "ciphertext_rejected", "update_dropped"})
DECLINE_EVENTS = frozenset({"client_excluded"})


class FitRound:
    """One round's fit step; also the round's bookkeeping for :class:`MetricsRecording`'s round line."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        recorder: RunRecorder,
        progress: RoundProgress,
        *,
        inner: Callable[[Grid, LegacyContext], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.progress = progress
        self.inner = inner
        self.tally = RoundTally()
        self.failed_rounds = 0
        self._labels: dict[int, str] = {}  # node id -> partition id, learnt from replies
        self._round = 0
        self._resumed_count = False
        recorder.listeners.append(self._on_event)
        if cfg.strategy.round_timeout_s == 0 and inner is None:
            log(WARNING, "No round deadline (strategy.round_timeout_s=0): a client that hangs while its node stays "
                "connected stalls the run; set one for deployments")  # fmt: skip

    # ---- the step -----------------------------------------------------------------------------
    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        config = context.state.config_records[MAIN_CONFIGS_RECORD]
        server_round = cast(int, config[Key.CURRENT_ROUND])
        self._round = server_round
        if not self._resumed_count:  # a resumed run's earlier failed rounds still count against the tolerance
            self._resumed_count = True
            self.failed_rounds = sum(1 for r, row in self.recorder.rows.items() if r < server_round and row.get("round_failed"))
        self.wait_for_nodes(context.client_manager, server_round)
        if self.inner is not None:
            self.tally.begin(server_round, 0)
            self.progress.start_round(server_round, context.client_manager.num_available())
            self.inner(grid, context)
            if not self.tally.sampled.get(server_round):  # the SecAgg+ stages halted before aggregate_fit
                self.tally.sampled[server_round] = 1
                self.tally.set(server_round, "secaggplus", Outcome.FAILED,
                               "secure aggregation halted: too few clients completed the SecAgg+ stages", "all")  # fmt: skip
            self._close(server_round, self._current_model(context))
            return
        parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        instructions = context.strategy.configure_fit(
            server_round=server_round, parameters=parameters, client_manager=context.client_manager
        )
        if not instructions:
            if training_ended(context.strategy):  # every remaining client declined (e.g. budgets spent): by design
                log(INFO, "Round %s: no clients selected; no training this round", server_round)
                return
            self.tally.begin(server_round, 1)
            self.tally.set(server_round, "sampling", Outcome.FAILED,
                           f"no clients could be sampled ({context.client_manager.num_available()} available, "
                           f"strategy.min_fit_clients={self.cfg.strategy.min_fit_clients})", "none")  # fmt: skip
            self._close(server_round, None, aggregated=False)
            return
        self.tally.begin(server_round, len(instructions))
        self.progress.start_round(server_round, len(instructions))
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        # With a deadline, an instruction expires soon after it: a node that comes back late must not
        # train (and spend privacy budget) for a round the server has closed.
        timeout = self.cfg.strategy.round_timeout_s
        ttl = timeout + TTL_MARGIN_S if timeout > 0 else None
        messages = [
            Message(
                content=compat.fitins_to_recorddict(fitins, True),
                dst_node_id=proxy.node_id,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
                ttl=ttl,
            )
            for proxy, fitins in instructions
        ]
        started = time.monotonic()
        replies, missing = self._collect(grid, messages, server_round)
        self.recorder.record(server_round, fit_time_s=round(time.monotonic() - started, 3))
        results, failures = self._classify(server_round, replies, proxies)
        self._missing(grid, server_round, missing, failures)
        aggregated, metrics = context.strategy.aggregate_fit(server_round, results, failures)
        if aggregated is not None:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=server_round, metrics=metrics)
        self._close(server_round, None if aggregated is None else parameters_to_ndarrays(aggregated),
                    aggregated=aggregated is not None)  # fmt: skip

    # ---- nodes ----------------------------------------------------------------------------------
    def wait_for_nodes(self, client_manager: ClientManager, server_round: int) -> None:
        """Return once ``min_available_clients`` nodes are connected; :class:`RunFailed` after ``node_wait_s``."""
        need = max(self.cfg.strategy.min_available_clients, self.cfg.strategy.min_fit_clients)
        have = client_manager.num_available()
        if have >= need:
            return
        budget = self.cfg.strategy.node_wait_s
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            self.progress.waiting(
                server_round,
                f"Round {server_round}: {have} of the {need} nodes needed (strategy.min_available_clients) are "
                f"connected; waiting for nodes to (re)connect ({waited:.0f} of {budget:.0f} s, strategy.node_wait_s)",
            )
            left = budget - waited
            if left <= 0 or client_manager.wait_for(need, timeout=max(1, int(min(WAIT_REPORT_S, left)))):
                have = client_manager.num_available()
                if have >= need:
                    log(INFO, "Round %s: %d nodes connected; going on", server_round, have)
                    return
            have = client_manager.num_available()
            if time.monotonic() - started >= budget:
                raise RunFailed(
                    f"round {server_round}: only {have} of the {need} nodes needed (strategy.min_available_clients) "
                    f"connected after waiting {budget:.0f} s (strategy.node_wait_s)"
                )

    # ---- replies ----------------------------------------------------------------------------------
    def _collect(self, grid: Grid, messages: list[Message], server_round: int) -> tuple[list[Message], dict[str, int]]:
        """Push, then pull until every reply is in or the deadline passes; (replies, message id -> node of the rest)."""
        nodes = [m.metadata.dst_node_id for m in messages]
        ids = [str(i) for i in grid.push_messages(messages)]
        pending = dict(zip(ids, nodes))
        timeout = self.cfg.strategy.round_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else None
        replies: list[Message] = []
        while pending:
            for msg in grid.pull_messages(list(pending)):
                node = pending.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
                replies.append(msg)
                self.progress.reply(server_round, self._label(node, msg), self._reply_outcome(msg))
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(PULL_INTERVAL_S)
        return replies, pending

    def _classify(
        self, server_round: int, replies: list[Message], proxies: dict[int, ClientProxy]
    ) -> tuple[list[tuple[ClientProxy, FitRes]], list[tuple[ClientProxy, FitRes] | BaseException]]:
        results: list[tuple[ClientProxy, FitRes]] = []
        failures: list[tuple[ClientProxy, FitRes] | BaseException] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            label = self._label(node, msg)
            if msg.has_content():
                try:
                    fitres = compat.recorddict_to_fitres(msg.content, False)
                except Exception as err:  # noqa: BLE001 - a reply that does not decode is the client's fault
                    failures.append(self._fail(server_round, node, label, Outcome.REFUSED,
                                               f"undecodable reply ({type(err).__name__}: {str(err)[:120]})"))  # fmt: skip
                    continue
                if fitres.status.code == Code.OK and node in proxies:
                    self.tally.set(server_round, node_key(node), Outcome.TRAINED, label=label)
                    results.append((proxies[node], fitres))
                    continue
                outcome, reason = Outcome.FAILED, one_line(fitres.status.message or "client reported an error status")
            else:
                outcome, reason = classify_error(msg.error)
                log(DEBUG, "Round %s: client %s error in full:\n%s", server_round, label, msg.error.reason)
            failures.append(self._fail(server_round, node, label, outcome, reason))
        return results, failures

    def _missing(
        self, grid: Grid, server_round: int, missing: dict[str, int], failures: list[tuple[ClientProxy, FitRes] | BaseException]
    ) -> None:
        if not missing:
            return
        connected = set(grid.get_node_ids())
        timeout = self.cfg.strategy.round_timeout_s
        for node in missing.values():
            label = self._label(node, None)
            if node in connected:
                failure = self._fail(server_round, node, label, Outcome.TIMED_OUT,
                                     f"no reply within the round deadline (strategy.round_timeout_s={timeout:g}); "
                                     "a late reply is dropped")  # fmt: skip
            else:
                failure = self._fail(server_round, node, label, Outcome.NODE_LOST,
                                     "node disconnected during the round (no reply)")  # fmt: skip
            failures.append(failure)

    def _fail(self, server_round: int, node: int, label: str, outcome: Outcome, reason: str) -> ClientFailure:
        self.tally.set(server_round, node_key(node), outcome, reason, label=label)
        self.recorder.event("client_failure", server_round, reason, client=label, outcome=outcome.value, node_id=node)
        log(WARNING, "Round %s: client %s %s: %s", server_round, label, outcome.value.replace("_", " "), reason)
        return ClientFailure(label, outcome, reason, node)

    def _label(self, node: int, msg: Message | None) -> str:
        """The client's partition id as it last reported it (in its metrics, or its error's tag), else the node id.

        A label is the client's claim, for display: the tally is keyed by node.
        """
        claimed: str | None = None
        if msg is not None and msg.has_content():
            metrics = msg.content.config_records.get("fitres.metrics")
            if metrics is not None and CLIENT_ID_KEY in metrics:
                claimed = str(metrics[CLIENT_ID_KEY])
        elif msg is not None and node not in self._labels:
            claimed, _ = tagged(msg.error.reason or "")
        if claimed is not None and LABEL.match(claimed):
            self._labels[node] = claimed
        return self._labels.get(node, node_key(node))

    @staticmethod
    def _reply_outcome(msg: Message) -> str:
        if not msg.has_content():
            return classify_error(msg.error)[0].value
        return "replied"

    # ---- wrappers' verdicts -------------------------------------------------------------------------
    def _on_event(self, record: dict) -> None:
        """Refusals and declines that the strategy's wrappers decide, as they record them."""
        kind, node = record.get("kind"), record.get("node_id")
        if node is None or record.get("round") != self._round or kind not in REFUSAL_EVENTS | DECLINE_EVENTS:
            return
        key = node_key(node)
        if kind in REFUSAL_EVENTS:
            self.tally.set(self._round, key, Outcome.REFUSED, one_line(str(record.get("reason", ""))))
        else:
            self.tally.set(self._round, key, Outcome.DECLINED, str(record.get("reason_code", "")))

    def note_results(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list) -> None:
        """Where another fit workflow (SecAgg+) ran the round: account for what the strategy was handed."""
        if self.inner is None or self.tally.sampled.get(server_round):
            return
        self.tally.sampled[server_round] = len(results) + len(failures)
        for proxy, _ in results:
            self.tally.set(server_round, node_key(proxy.node_id), Outcome.TRAINED)
        for i, failure in enumerate(failures):
            reason = one_line(str(failure if isinstance(failure, BaseException) else failure[1].status.message))
            self.tally.set(server_round, f"unknown-{i}", Outcome.FAILED, reason)

    # ---- end of the fit step ---------------------------------------------------------------------------
    @staticmethod
    def _current_model(context: LegacyContext) -> list[np.ndarray]:
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))

    def _close(self, server_round: int, model: list[np.ndarray] | None, *, aggregated: bool = True) -> None:
        """Counts into the round row; a non-finite model or too many failed rounds stop the run.

        A round is failed when faults left fewer than ``min_fit_clients`` updates, or when
        nothing was aggregated and not every sampled client declined.
        """
        row = self.tally.row(server_round)
        self.recorder.record(server_round, **row)
        if model is not None:
            for i, array in enumerate(model):
                if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                    raise RunFailed(
                        f"round {server_round}: the aggregated model is not finite (array {i} holds NaN/Inf); "
                        f"the run stops ({self.tally.line(server_round)})"
                    )
        counts = self.tally.counts(server_round)
        faults = row["fit_failures"]
        all_declined = counts[Outcome.DECLINED] == row["fit_sampled"] > 0
        if (counts[Outcome.TRAINED] < self.cfg.strategy.min_fit_clients and faults) or (
            not aggregated and not all_declined
        ):
            self.failed_rounds += 1
            line = f"round {server_round}: {self.tally.line(server_round)}"
            tolerance = self.cfg.strategy.max_failed_rounds
            self.recorder.record(server_round, round_failed=True)
            self.recorder.event("round_failed", server_round, line, failed_rounds=self.failed_rounds, tolerance=tolerance)
            if self.failed_rounds > tolerance:
                raise RunFailed(line)
            log(WARNING, "%s (failed round %d of %d tolerated, strategy.max_failed_rounds)", line,
                self.failed_rounds, tolerance)  # fmt: skip

    def model_broken(self, server_round: int, loss: float) -> None:
        """A finite model whose outputs overflow (test loss NaN/Inf) is as broken as a non-finite one: stop."""
        raise RunFailed(
            f"round {server_round}: the global model's test loss is not finite ({loss}): its outputs overflow, "
            f"the run stops ({self.tally.line(server_round) if server_round in self.tally.rounds else 'no training'})"
        )

    def end_round(self, server_round: int) -> None:
        """The round's one line (counts, dominant reason, accuracy, epsilon, time), once it is evaluated."""
        tally = self.tally.line(server_round) if server_round in self.tally.rounds else "no training this round"
        row = self.recorder.rows.get(server_round, {})
        self.progress.end_round(server_round, round_summary(server_round, self.cfg.num_rounds, tally, row), row)
