"""The ServerApp's side of the control plane: operators' actions, applied at round boundaries.

:class:`RunControl` is the outermost strategy wrapper of a recorded run. The API
only writes a request to the run store; the round loop calls
:meth:`RunControl.at_boundary` after every round (and before round 1), which
reads the pending requests in order, applies or refuses each, and settles it in
the store with the round after which it was applied. Nothing changes while a
round is in flight, so every round runs under one set of rules, and what a
round ran under can be read back from the audit chain (each settled action is an
``admin_action`` event, hence an audit entry naming who asked).

Why a wrapper: blocking goes through the same :class:`~fedapp.exclusion.ExclusionList`
as privacy-budget exclusions and quarantine (Flower's sampling criterion), the
clients-per-round cap through the client manager the base rule samples from, and a
rule switch replaces the innermost strategy, so every fedapp wrapper (validation,
detection, recording) stays around the new rule.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

from flwr.common import FitIns, Parameters, Scalar, log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg, Strategy

from fedapp.config import ExperimentConfig
from fedapp.control.actions import BLOCK_CODE, Settings, refusal
from fedapp.exclusion import ClientExclusion, ClientManagerView, Exclusion, ExclusionList
from fedapp.metrics import RunRecorder
from fedapp.store.db import RunStore
from fedapp.store.records import ActionRecord
from fedapp.store.state import strategy_chain
from fedapp.strategies import BASE_STRATEGIES, clients_per_round
from fedapp.wrappers import Failures, FitResults, StrategyWrapper, client_label

# FedAvg's constructor arguments a switched-in rule takes over from the rule it replaces.
_CARRIED = (
    "fraction_fit", "fraction_evaluate", "min_fit_clients", "min_evaluate_clients", "min_available_clients",
    "evaluate_fn", "on_fit_config_fn", "on_evaluate_config_fn", "accept_failures", "initial_parameters",
    "fit_metrics_aggregation_fn", "evaluate_metrics_aggregation_fn",
)


class CappedSampling(ClientManagerView):
    """A view of ``manager`` that samples exactly ``k`` clients (fewer when fewer may be sampled).

    Flower's ``sample`` refuses outright when asked for more clients than pass the
    criterion; capping at the eligible count keeps a round going after a block.
    """

    def __init__(self, manager: ClientManager, k: int) -> None:
        super().__init__(manager)
        self.k = k

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None
    ) -> list[ClientProxy]:
        eligible = sum(1 for c in self.manager.all().values() if criterion is None or criterion.select(c))
        return self.manager.sample(min(self.k, eligible), min_num_clients, criterion)


class RunControl(StrategyWrapper):
    """Apply operators' actions between rounds; see the module docstring.

    Parameters
    ----------
    strategy
        The run's strategy (fedapp's wrapper chain around the base rule).
    cfg
        The run's configuration (what the refusals are judged against).
    store, run_id
        Where the requests are read and settled.
    recorder
        Where the ``admin_action`` events go (the store and the audit chain read them).
    poll_s
        How often a paused run looks for its resume. (default: 0.5)
    """

    def __init__(
        self,
        strategy: Strategy,
        cfg: ExperimentConfig,
        store: RunStore,
        run_id: str,
        recorder: RunRecorder,
        *,
        poll_s: float = 0.5,
    ) -> None:
        super().__init__(strategy)
        self.cfg, self.store, self.run_id, self.recorder, self.poll_s = cfg, store, run_id, recorder, poll_s
        self.settings = Settings(rule=cfg.strategy.name)
        self.blocked: dict[str, Exclusion] = {}  # node id -> the operator's block
        self.displaced: dict[str, Exclusion] = {}  # node id -> the exclusion a block replaced (restored on unblock)
        self.nodes_of: dict[str, set[str]] = {}  # client label -> node ids that presented it
        self.stop_requested: dict[str, Any] | None = None
        self.paused = False
        self.client_manager: ClientManager | None = None
        members = strategy_chain(strategy)
        self.excluded: ExclusionList = next(
            (m.excluded for m in members if isinstance(m, ClientExclusion)), ExclusionList()
        )

    # ----------------------------------------------------------------- rounds
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.client_manager = client_manager
        for node, entry in self.blocked.items():  # a quarantine's release must not lift an operator's block
            if node not in self.excluded:
                self.excluded.add(entry)
        k = self.settings.clients_per_round
        manager = client_manager if k is None else CappedSampling(client_manager, k)
        return super().configure_fit(server_round, parameters, manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        aggregated = super().aggregate_fit(server_round, results, failures)
        for proxy, res in results:  # after the recording wrapper bound labels to nodes (a borrowed label is dropped)
            self.nodes_of.setdefault(client_label(proxy, res), set()).add(str(proxy.cid))
        return aggregated

    # -------------------------------------------------------------- boundary
    def at_boundary(self, server_round: int) -> None:
        """Apply or refuse every pending request, in the order they were made (after ``server_round``)."""
        for action in self.store.actions(self.run_id, status="pending"):
            self._settle(action, server_round)

    def wait_while_paused(self, server_round: int, on_settled: Callable[[], None], *, stop_file: Callable[[], bool]) -> None:
        """Hold the run after ``server_round`` until an operator resumes or stops it.

        Requests that arrive meanwhile are applied at once (their boundary is this
        one); ``on_settled`` records their events outside a round.
        """
        log(INFO, "Paused after round %s by an operator; waiting for resume or stop", server_round)
        while self.paused and self.stop_requested is None:
            if stop_file():
                break
            time.sleep(self.poll_s)
            pending = self.store.actions(self.run_id, status="pending")
            for action in pending:
                self._settle(action, server_round)
            if pending:
                on_settled()
        log(INFO, "Run %s after round %s", "stopping" if self.stop_requested else "resumed", server_round)

    def _settle(self, action: ActionRecord, server_round: int) -> None:
        try:
            outcome, result, effective = self._apply(action, server_round)
        except Exception as err:  # noqa: BLE001 - a request must never take the run down
            outcome, result, effective = "refused", f"could not apply: {type(err).__name__}: {err}", None
        assert action.id is not None
        if not self.store.settle_action(action.id, outcome, boundary_round=server_round,
                                        effective_round=effective, result=result):
            return  # settled by another process (a stale attempt): not ours to record
        level = INFO if outcome == "applied" else WARNING
        log(level, "Operator %s: %s %s %s: %s", action.requested_by, action.action, action.params, outcome, result)
        self.recorder.event(
            "admin_action", server_round, result, action_id=action.id, action=action.action, params=action.params,
            requested_by=action.requested_by, requested_at=action.requested_at, status=outcome,
            effective_round=effective, operator_reason=action.reason,
        )

    def _apply(self, action: ActionRecord, server_round: int) -> tuple[str, str, int | None]:
        """``(status, what happened, first round under it)`` for one request."""
        nxt = server_round + 1
        if server_round >= self.cfg.num_rounds:
            return "refused", f"the run has finished its last round ({server_round})", None
        why = refusal(self.cfg, self.settings, action.action, action.params)
        if why is not None:
            return "refused", why, None
        kind, params = action.action, action.params
        if kind == "block":
            return self._block(str(params["client"]), action, server_round)
        if kind == "unblock":
            return self._unblock(str(params["client"]), nxt)
        if kind == "set_rule":
            old = self.settings.rule
            self.switch_rule(str(params["rule"]))
            return "applied", f"aggregation rule {old} -> {self.settings.rule} from round {nxt}", nxt
        if kind == "set_clients_per_round":
            self.settings = dataclasses.replace(self.settings, clients_per_round=int(params["clients_per_round"]))
            return "applied", f"{self.settings.clients_per_round} clients per round from round {nxt}", nxt
        if kind == "pause":
            if self.paused:
                return "refused", "the run is already paused", None
            self.paused = True
            return "applied", f"paused after round {server_round} (checkpoint taken)", None
        if kind == "resume":
            if not self.paused:
                return "refused", "the run is not paused", None
            self.paused = False
            return "applied", f"resumed; round {nxt} starts", nxt
        if kind == "stop":
            self.stop_requested = {"by": action.requested_by, "reason": action.reason, "requested_at": action.requested_at}
            return "applied", f"stopped after round {server_round} (checkpoint taken; `fedapp resume` continues)", None
        return "refused", f"unknown action {kind!r}", None

    def _block(self, client: str, action: ActionRecord, server_round: int) -> tuple[str, str, int | None]:
        nodes = self._nodes(client)
        if not nodes:
            return "refused", f"client {client} has not taken part in this run (no node known under that label)", None
        new = [n for n in nodes if n not in self.blocked]
        if not new:
            return "refused", f"client {client} is already blocked", None
        live = set(self.client_manager.all()) if self.client_manager is not None else set()
        samplable = len([n for n in live if n not in self.excluded and n not in new])
        if live and samplable < self.cfg.strategy.min_fit_clients:
            return "refused", (
                f"blocking client {client} would leave {samplable} samplable client(s), fewer than "
                f"strategy.min_fit_clients={self.cfg.strategy.min_fit_clients}"
            ), None
        dp = self._dp_sampling()
        if live and dp is not None and self._sample_size(samplable) < dp[1]:
            return "refused", (
                f"blocking client {client} would leave {samplable} samplable client(s), so rounds of "
                f"{self._sample_size(samplable)} instead of the {dp[1]} that {dp[0]} is calibrated and accounted for "
                "(its noise would be too small and its epsilon understated)"
            ), None
        reason = f"blocked by {action.requested_by}" + (f": {action.reason}" if action.reason else "")
        for node in new:
            entry = Exclusion(node, client, server_round, BLOCK_CODE, reason)
            self.blocked[node] = entry
            displaced = self.excluded.remove(node)  # an operator's block outranks (and outlives) another exclusion...
            if displaced is not None:
                self.displaced[node] = displaced  # ...which comes back when the block is lifted
            self.excluded.add(entry)
        return "applied", f"client {client} blocked from round {server_round + 1}", server_round + 1

    def _sample_size(self, available: int) -> int:
        """How many clients the rule in force samples from ``available`` (FedAvg's formula, or the operator's cap)."""
        k = self.settings.clients_per_round
        return min(available, k if k is not None else clients_per_round(self.cfg, available))

    def _dp_sampling(self) -> tuple[str, int] | None:
        """``(mechanism, clients per round)`` when a server-side DP accountant assumes a fixed sample size."""
        cfg = self.cfg
        if not (cfg.privacy.central.enabled or cfg.secagg.noise_sigma_total > 0):
            return None
        per_round = min(cfg.partition.num_clients, clients_per_round(cfg))
        return ("central DP" if cfg.privacy.central.enabled else "distributed DP"), per_round

    def _unblock(self, client: str, nxt: int) -> tuple[str, str, int | None]:
        nodes = [n for n, e in self.blocked.items() if e.client == client]
        if not nodes:
            return "refused", f"client {client} is not blocked", None
        restored = []
        for node in nodes:
            del self.blocked[node]
            current = next((e for e in self.excluded.entries() if e.client == client and e.reason_code == BLOCK_CODE), None)
            if current is not None:
                self.excluded.remove(current.node_id)
            displaced = self.displaced.pop(node, None)
            if displaced is not None:  # quarantined or out of budget before the block: still so
                self.excluded.add(dataclasses.replace(displaced, node_id=current.node_id if current else node))
                restored.append(f"{displaced.reason_code}: {displaced.reason}")
        if restored:
            return "applied", f"client {client} unblocked; still excluded ({'; '.join(restored)})", nxt
        return "applied", f"client {client} may be sampled again from round {nxt}", nxt

    def _nodes(self, client: str) -> set[str]:
        nodes = set(self.nodes_of.get(client, set()))
        if client.startswith("node-") and self.client_manager is not None and client[5:] in self.client_manager.all():
            nodes.add(client[5:])
        return nodes

    def switch_rule(self, rule: str) -> None:
        """Replace the innermost strategy with ``rule``, keeping its sampling, evaluation and metrics settings."""
        chain = strategy_chain(self)
        parent, base = chain[-2], chain[-1]
        if not isinstance(base, FedAvg):
            raise TypeError(f"cannot switch the rule of a {type(base).__name__}")
        carried = {k: getattr(base, k) for k in _CARRIED if hasattr(base, k)}
        new = BASE_STRATEGIES[rule](self.cfg, carried)
        parent.strategy = new  # type: ignore[attr-defined]
        self.settings = dataclasses.replace(self.settings, rule=rule)

    # ------------------------------------------------------------ checkpoint
    def restore_settings(self, saved: dict[str, Any] | None) -> None:
        """Put back the rule and clients per round a checkpoint was taken under (before its state is loaded)."""
        if not saved:
            return
        if saved.get("rule") and saved["rule"] != self.settings.rule:
            self.switch_rule(str(saved["rule"]))
        k = saved.get("clients_per_round")
        self.settings = dataclasses.replace(self.settings, clients_per_round=None if k is None else int(k))

    def saved_settings(self) -> dict[str, Any]:
        return {"rule": self.settings.rule, "clients_per_round": self.settings.clients_per_round}

    def state_dict(self) -> dict[str, object]:
        """Operators' blocks and the labels nodes presented (node ids are re-bound by label after a restart)."""
        return {
            "blocked": [dataclasses.asdict(e) for e in self.blocked.values()],
            "displaced": [dataclasses.asdict(e) for e in self.displaced.values()],
            "nodes_of": {label: sorted(nodes) for label, nodes in self.nodes_of.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.blocked = {e["node_id"]: Exclusion(**e) for e in state.get("blocked", [])}  # type: ignore[union-attr]
        self.displaced = {e["node_id"]: Exclusion(**e) for e in state.get("displaced", [])}  # type: ignore[union-attr]
        self.nodes_of = {str(k): set(v) for k, v in state.get("nodes_of", {}).items()}  # type: ignore[union-attr]
