"""Strategy wrappers: take a built Flower strategy, keep it, change one concern.

:class:`StrategyWrapper` delegates all six ``Strategy`` methods; each wrapper
overrides only what it adds. Wrappers stack (``Recording(Validation(FedAvg))``),
which is how privacy, secure aggregation and robustness plug in later without
touching Flower's round loop.
"""

from __future__ import annotations

from logging import INFO, WARNING

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


class MalformedUpdateError(ValueError):
    """A client's update cannot be aggregated; the message says why."""


def check_update(arrays: list[np.ndarray], expected: list[tuple[int, ...]], num_examples: int) -> None:
    """Raise :class:`MalformedUpdateError` unless ``arrays`` fit the global model."""
    if len(arrays) != len(expected):
        raise MalformedUpdateError(f"expected {len(expected)} arrays, got {len(arrays)}")
    for i, (arr, shape) in enumerate(zip(arrays, expected)):
        if tuple(arr.shape) != tuple(shape):
            raise MalformedUpdateError(f"array {i} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.issubdtype(arr.dtype, np.number):
            raise MalformedUpdateError(f"array {i} has non-numeric dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise MalformedUpdateError(f"array {i} contains NaN or Inf")
    if num_examples <= 0:
        raise MalformedUpdateError(f"num_examples must be > 0, got {num_examples}")


def update_norm(weights: NDArrays, reference: NDArrays) -> float | None:
    """L2 norm of ``weights - reference``; None when the reply is not a plain model (ciphertexts, declines)."""
    if not reference or len(weights) != len(reference) or any(w.shape != r.shape for w, r in zip(weights, reference)):
        return None
    return float(np.sqrt(sum(float(np.sum((w.astype(np.float64) - r) ** 2)) for w, r in zip(weights, reference))))


def _order_key(label: str) -> tuple[int, str]:
    if label.isascii() and label.isdigit() and len(label) <= 18:
        return (0, f"{int(label):018d}")
    return (1, label)


# Keys of a client record that the server writes; a client's metric of the same name is not allowed to replace them.
_RECORD_KEYS = frozenset({"round", "client", "num_examples", "update_norm", "line", "kind", "time"})


def client_label(proxy: ClientProxy, res: FitRes | EvaluateRes | None = None) -> str:
    """The client's partition id when it reported one, else its node id."""
    if res is not None and CLIENT_ID_KEY in res.metrics:
        return str(res.metrics[CLIENT_ID_KEY])
    return f"node-{proxy.cid}"


class UpdateValidation(StrategyWrapper):
    """Drop updates with wrong array count, wrong shapes, NaN/Inf or no examples.

    A rejected update becomes a failure with its reason (logged and recorded);
    the remaining updates are aggregated, so one broken client loses nothing
    of the others' work.
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder | None = None) -> None:
        super().__init__(strategy)
        self.recorder = recorder
        self._expected: list[tuple[int, ...]] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._expected = [a.shape for a in parameters_to_ndarrays(parameters)]
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        accepted: FitResults = []
        failures = list(failures)
        for proxy, res in results:
            try:
                check_update(parameters_to_ndarrays(res.parameters), self._expected, res.num_examples)
            except (MalformedUpdateError, ValueError) as err:
                who = client_label(proxy, res)
                log(WARNING, "Round %s: rejected update from client %s: %s", server_round, who, err)
                if self.recorder:
                    self.recorder.event("update_rejected", server_round, str(err), client=who)
                failures.append(MalformedUpdateError(f"client {who}: {err}"))
                continue
            accepted.append((proxy, res))
        if not accepted:
            log(WARNING, "Round %s: no valid update to aggregate; keeping the current model", server_round)
            return None, {}
        return super().aggregate_fit(server_round, accepted, failures)


class MetricsRecording(StrategyWrapper):
    """Record round metrics, per-client reports and failures; log one line per round."""

    def __init__(self, strategy: Strategy, recorder: RunRecorder) -> None:
        super().__init__(strategy)
        self.recorder = recorder
        self._global: NDArrays = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.recorder.round_started(server_round)
        self._global = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Replies arrive in completion order; aggregating them in client order makes the
        # floating-point sum, hence the model, the same in every run with the same seed
        # (what a resumed run is checked against).
        results = sorted(results, key=lambda r: _order_key(client_label(*r)))
        for proxy, res in results:
            norm = update_norm(parameters_to_ndarrays(res.parameters), self._global)
            extra = {} if norm is None else {"update_norm": norm}
            reported = {k: v for k, v in res.metrics.items() if k not in _RECORD_KEYS}
            self.recorder.client(
                server_round, client_label(proxy, res), **reported, num_examples=res.num_examples, **extra
            )
        for failure in failures:
            reason = failure if isinstance(failure, BaseException) else failure[1].status.message
            self.recorder.event("fit_failure", server_round, str(reason))
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.recorder.record(server_round, fit_clients=len(results), fit_failures=len(failures), **metrics)
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
