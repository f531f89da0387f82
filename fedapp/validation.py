"""Server-side checks every plain client update passes before it is aggregated.

Threat model: any client (or whoever controls its node) may send anything that
deserialises -- the wrong number of arrays, wrong shapes or dtypes, NaN/Inf,
a finite but absurd update (a single one took FedAvg from 98.6 % to 9.4 %; at
1e37 the global model became NaN), or an update it sent before. The server
knows nothing about attacks here: the norm bounds are an absolute ceiling
(``validation.max_update_norm``) and a multiple of the round's lower-median
update norm (``validation.relative_norm_bound``), so one client out of two
cannot drag the reference up with it. Robust rules (Krum, trimmed mean) and the
anomaly detector still handle subtler poisoning; these checks keep a malformed
update from ever reaching them.

Where secure aggregation hides single updates (Paillier, SecAgg+) the server
cannot check them; there each client's own clip bounds its contribution.
"""

from __future__ import annotations

import hashlib
import statistics
from logging import WARNING

import numpy as np
from flwr.common import FitIns, NDArrays, Parameters, Scalar, log, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedapp.config import ValidationConfig
from fedapp.metrics import RunRecorder
from fedapp.wrappers import Failures, FitResults, StrategyWrapper, client_label, update_norm


MIN_FOR_MEDIAN = 3  # non-zero norms needed before the relative bound applies
REFERENCE_FLOOR = 0.1  # the reference norm never drops below this fraction of the previous round's


class MalformedUpdateError(ValueError):
    """A client's update cannot be aggregated; the message says why.

    Raised by the checks with the reason only; the failure :class:`UpdateValidation` passes
    on to the inner strategy also carries the ``proxy`` and ``client`` it refused, so the
    anomaly detector counts a refusal against that client's reputation.
    """

    def __init__(self, message: str, *, proxy: ClientProxy | None = None, client: str | None = None,
                 reason: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.proxy = proxy
        self.client = client
        self.reason = reason if reason is not None else message


def decode(parameters: Parameters) -> NDArrays:
    """The arrays of a reply; anything that does not deserialise is a :class:`MalformedUpdateError`."""
    try:
        return parameters_to_ndarrays(parameters)
    except Exception as err:  # noqa: BLE001 - any decoding failure is the client's, not the server's
        raise MalformedUpdateError(f"undecodable update ({type(err).__name__}: {str(err)[:120]})") from None


def check_update(
    arrays: list[np.ndarray], expected: list[tuple[int, ...]], num_examples: int, dtypes: list[np.dtype] | None = None,
    max_num_examples: int | None = None,
) -> None:
    """Raise :class:`MalformedUpdateError` unless ``arrays`` fit the global model (count, shape, dtype, finite)
    and the claimed sample count is in ``[1, max_num_examples]``."""
    if len(arrays) != len(expected):
        raise MalformedUpdateError(f"expected {len(expected)} arrays, got {len(arrays)}")
    for i, (arr, shape) in enumerate(zip(arrays, expected)):
        if tuple(arr.shape) != tuple(shape):
            raise MalformedUpdateError(f"array {i} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise MalformedUpdateError(f"array {i} has dtype {arr.dtype}, expected a real number type")
        if dtypes is not None and arr.dtype != dtypes[i]:
            raise MalformedUpdateError(f"array {i} has dtype {arr.dtype}, expected {dtypes[i]}")
        if not np.all(np.isfinite(arr)):
            raise MalformedUpdateError(f"array {i} contains NaN or Inf")
    if num_examples <= 0:
        raise MalformedUpdateError(f"num_examples must be > 0, got {num_examples}")
    if max_num_examples is not None and num_examples > max_num_examples:
        raise MalformedUpdateError(
            f"num_examples {num_examples} exceeds validation.max_num_examples={max_num_examples} "
            "(FedAvg weighs by it: an inflated count would let one update replace the mean)"
        )


def update_digest(arrays: NDArrays) -> str:
    """SHA-256 over the arrays' dtypes, shapes and bytes (a replay is byte-identical)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class UpdateValidation(StrategyWrapper):
    """Refuse malformed, absurd or replayed updates; aggregate the rest.

    A refused update becomes a failure with its reason (logged and recorded as an
    ``update_rejected`` event naming the client); the remaining updates are
    aggregated, so one broken client loses nothing of the others' work.
    """

    optional_state = True  # a checkpoint without the replay memory resumes with it empty (fedapp.store.state)

    def __init__(
        self, strategy: Strategy, recorder: RunRecorder | None = None, settings: ValidationConfig | None = None,
        *, strict_dtype: bool = True,
    ) -> None:
        super().__init__(strategy)
        self.recorder = recorder
        self.settings = settings if settings is not None else ValidationConfig()
        self.strict_dtype = strict_dtype  # SecAgg+ hands back its dequantised mean as float64
        self._global: NDArrays = []
        self._seen: dict[str, tuple[int, str]] = {}  # node id -> (round, digest) of its last update
        self._reference: float | None = None  # the last round's median update norm (floors the next one)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        failures = list(failures)
        shapes = [a.shape for a in self._global]
        dtypes = [a.dtype for a in self._global]
        well_formed: list[tuple[ClientProxy, object, str, float]] = []
        for proxy, res in results:
            who = client_label(proxy, res)
            try:
                arrays = decode(res.parameters)
                check_update(arrays, shapes, res.num_examples, dtypes if self.strict_dtype else None,
                             self.settings.max_num_examples)  # fmt: skip
                self._check_replay(proxy.cid, server_round, arrays)
                norm = update_norm(arrays, self._global)
                self._check_absolute(norm)
            except MalformedUpdateError as err:
                failures.append(self._refuse(server_round, proxy, who, str(err)))
                continue
            well_formed.append((proxy, res, who, norm if norm is not None else 0.0))
        accepted = self._within_relative_bound(server_round, well_formed, failures)
        if not accepted:
            log(WARNING, "Round %s: no valid update to aggregate; keeping the current model", server_round)
            return None, {}
        return super().aggregate_fit(server_round, accepted, failures)

    def _check_replay(self, node: str, server_round: int, arrays: NDArrays) -> None:
        if not self.settings.replay_check:
            return
        digest = update_digest(arrays)
        previous = self._seen.get(node)
        self._seen[node] = (server_round, digest)
        if previous is not None and previous[1] == digest and previous[0] != server_round:
            raise MalformedUpdateError(f"replayed update: byte-identical to its round {previous[0]} update")

    def _check_absolute(self, norm: float | None) -> None:
        bound = self.settings.max_update_norm
        if bound > 0 and norm is not None and norm > bound:
            raise MalformedUpdateError(f"update norm {norm:.4g} exceeds validation.max_update_norm={bound:g}")

    def _within_relative_bound(
        self, server_round: int, candidates: list[tuple[ClientProxy, object, str, float]], failures: Failures
    ) -> FitResults:
        """Refuse norms above ``relative_norm_bound`` x the round's reference norm.

        The reference is the lower median of the non-zero norms, needs three of them
        (with two, neither can be told from the outlier: the absolute bound applies),
        and is floored at a tenth of the previous round's, so that colluders sending
        tiny updates cannot pull it down far enough to refuse the honest ones.
        """
        factor = self.settings.relative_norm_bound
        norms = [norm for *_, norm in candidates if norm > 0]
        if factor <= 0 or len(norms) < MIN_FOR_MEDIAN:
            return [(proxy, res) for proxy, res, _, _ in candidates]  # type: ignore[misc]
        reference = statistics.median_low(norms)
        if self._reference is not None:
            reference = max(reference, REFERENCE_FLOOR * self._reference)
        kept: FitResults = []
        accepted: list[float] = []
        for proxy, res, who, norm in candidates:
            if norm > factor * reference:
                failures.append(self._refuse(
                    server_round, proxy, who,
                    f"update norm {norm:.4g} is {norm / reference:.1f}x the round's median {reference:.4g} "
                    f"(validation.relative_norm_bound={factor:g})",
                ))  # fmt: skip
                continue
            kept.append((proxy, res))  # type: ignore[arg-type]
            accepted.append(norm)
        if accepted:
            self._reference = statistics.median_low(accepted)
        return kept

    def _refuse(self, server_round: int, proxy: ClientProxy, who: str, reason: str) -> MalformedUpdateError:
        log(WARNING, "Round %s: refused update from client %s: %s", server_round, who, reason)
        if self.recorder:
            self.recorder.event("update_rejected", server_round, reason, client=who, node_id=proxy.cid)
        return MalformedUpdateError(f"client {who}: {reason}", proxy=proxy, client=who, reason=reason)

    def state_dict(self) -> dict[str, object]:
        """The digests of each node's last update and the last reference norm (a resumed run keeps both)."""
        return {"seen": {node: [r, d] for node, (r, d) in self._seen.items()}, "reference": self._reference}

    def load_state_dict(self, state: dict[str, object]) -> None:
        seen = state.get("seen", {})
        self._seen = {str(node): (int(v[0]), str(v[1])) for node, v in seen.items()}  # type: ignore[union-attr]
        reference = state.get("reference")
        self._reference = None if reference is None else float(reference)  # type: ignore[arg-type]
