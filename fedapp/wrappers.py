"""Strategy wrappers: take a built Flower strategy, keep it, change one concern.

:class:`StrategyWrapper` delegates all six ``Strategy`` methods; each wrapper
overrides only what it adds. Wrappers stack (``Recording(Validation(FedAvg))``),
which is how privacy, secure aggregation and robustness plug in later without
touching Flower's round loop.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    log,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedapp.metrics import RunRecorder
from fedapp.rounds.outcomes import LABEL

if TYPE_CHECKING:
    from fedapp.rounds.workflow import FitRound

CLIENT_ID_KEY = "partition_id"  # clients report their partition id under this metrics key
# A client that will not train this round replies with the unchanged parameters and
# {DECLINED_KEY: 1, REASON_CODE_KEY: <code>, REASON_KEY: <text>} (see fedapp.exclusion).
DECLINED_KEY = "declined"
REASON_CODE_KEY = "reason_code"
REASON_KEY = "reason"
EPSILON_KEY = "epsilon"  # a DP-SGD client's cumulative epsilon over every round it trained in

FitResults = list[tuple[ClientProxy, FitRes]]
Failures = list[tuple[ClientProxy, FitRes] | BaseException]


class StrategyWrapper(Strategy):
    """Delegates every call to ``strategy``; subclasses override what they change."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)


def update_norm(weights: NDArrays, reference: NDArrays) -> float | None:
    """L2 norm of ``weights - reference``; None when the reply is not a plain model (ciphertexts, declines)."""
    if not reference or len(weights) != len(reference) or any(w.shape != r.shape for w, r in zip(weights, reference)):
        return None
    if not all(np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer) for w in weights):
        return None  # text, complex, bool: no norm (validation refuses it)
    return float(np.sqrt(sum(float(np.sum((w.astype(np.float64) - r) ** 2)) for w, r in zip(weights, reference))))


def _order_key(label: str) -> tuple[int, str]:
    if label.isascii() and label.isdigit() and len(label) <= 18:
        return (0, f"{int(label):018d}")
    return (1, label)


# Keys of a client record that the server writes; a client's metric of the same name is not allowed to replace them.
_RECORD_KEYS = frozenset({"round", "client", "num_examples", "update_norm", "line", "kind", "time"})


def client_label(proxy: ClientProxy, res: FitRes | EvaluateRes | None = None) -> str:
    """The client's partition id when it reported a plausible one (``[\\w.-]{1,40}``), else its node id.

    The id is the client's own claim: it names the client in records, never decides anything.
    """
    if res is not None and CLIENT_ID_KEY in res.metrics and LABEL.match(str(res.metrics[CLIENT_ID_KEY])):
        return str(res.metrics[CLIENT_ID_KEY])
    return f"node-{proxy.cid}"


class MetricsRecording(StrategyWrapper):
    """Record round metrics, per-client reports and failures; log one line per round.

    It is also where a client's claimed label is bound to its node, before any
    other wrapper reads it: a label belongs to the first node that presents it,
    for the whole run. Another live node that claims it is recorded as
    ``node-<id>`` (its claim dropped, a ``label_conflict`` event says so), so no
    node can write into another client's record (its epsilon, its refusals) or
    draw an operator's block meant for another. A label whose node is gone
    (a restarted SuperNode, a resumed run) passes to the node that presents it next.
    """

    optional_state = True  # a checkpoint from before label binding loads with no bindings

    def __init__(self, strategy: Strategy, recorder: RunRecorder, rounds: "FitRound | None" = None) -> None:
        super().__init__(strategy)
        self.recorder = recorder
        self.rounds = rounds  # the fit step's accounting: the round line names what became of every client
        self._global: NDArrays = []
        self.label_owner: dict[str, str] = {}  # claimed label -> node id (ClientProxy.cid)
        self._live: set[str] = set()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.recorder.round_started(server_round)
        self._global = parameters_to_ndarrays(parameters)
        self._live = set(client_manager.all())
        return super().configure_fit(server_round, parameters, client_manager)

    def bind_labels(self, server_round: int, results: FitResults) -> None:
        """Drop the label claim of every reply whose label another live node holds (see the class docstring)."""
        live = self._live | {str(proxy.cid) for proxy, _ in results}
        for proxy, res in results:
            claimed = res.metrics.get(CLIENT_ID_KEY)
            if claimed is None or not LABEL.match(str(claimed)):
                continue
            label, node = str(claimed), str(proxy.cid)
            owner = self.label_owner.get(label)
            if owner is None or (owner != node and self._live and owner not in live):
                self.label_owner[label] = node
            elif owner != node:
                del res.metrics[CLIENT_ID_KEY]
                reason = f"node {node} claimed label {label!r}, which node {owner} holds; recorded as node-{node}"
                log(WARNING, "Round %s: %s", server_round, reason)
                self.recorder.event("label_conflict", server_round, reason, client=f"node-{node}", node_id=node,
                                    claimed=label)

    def state_dict(self) -> dict[str, object]:
        return {"label_owner": dict(self.label_owner)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.label_owner = {str(k): str(v) for k, v in state.get("label_owner", {}).items()}  # type: ignore[union-attr]

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.bind_labels(server_round, results)
        # Replies arrive in completion order; aggregating them in client order makes the
        # floating-point sum, hence the model, the same in every run with the same seed
        # (what a resumed run is checked against).
        results = sorted(results, key=lambda r: _order_key(client_label(*r)))
        for proxy, res in results:
            try:
                norm = update_norm(parameters_to_ndarrays(res.parameters), self._global)
            except Exception:  # noqa: BLE001 - undecodable: validation refuses it with the reason
                norm = None
            extra = {} if norm is None else {"update_norm": norm}
            reported = {k: v for k, v in res.metrics.items() if k not in _RECORD_KEYS}
            self.recorder.client(
                server_round, client_label(proxy, res), **reported, num_examples=res.num_examples, **extra
            )
        if self.rounds is not None:
            self.rounds.note_results(server_round, results, failures)
        else:
            for failure in failures:
                reason = failure if isinstance(failure, BaseException) else failure[1].status.message
                self.recorder.event("fit_failure", server_round, str(reason))
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.recorder.record(server_round, fit_clients=len(results), **metrics)
        if self.rounds is None:
            self.recorder.record(server_round, fit_failures=len(failures))
        return params, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        if results:
            n = sum(r.num_examples for _, r in results)
            acc = sum(r.num_examples * float(r.metrics.get("accuracy", 0.0)) for _, r in results) / max(n, 1)
            self.recorder.record(server_round, federated_loss=loss, federated_accuracy=acc)
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        result = super().evaluate(server_round, parameters)
        if result is not None:
            loss, metrics = result
            self.recorder.record(server_round, test_loss=loss, **metrics)
        if self.rounds is not None:
            if server_round > 0:
                self.rounds.end_round(server_round)
                if result is not None and not math.isfinite(float(result[0])):
                    self.rounds.model_broken(server_round, float(result[0]))
            return result
        if result is not None:
            loss, metrics = result
            row = self.recorder.rows[server_round]
            log(
                INFO,
                "Round %s: test accuracy %.2f %%, test loss %.4f%s",
                server_round,
                100 * float(metrics.get("test_accuracy", float("nan"))),
                loss,
                f", {row['round_time_s']:.1f} s" if "round_time_s" in row else "",
            )
        return result
