"""Server momentum (FedAvgM's update rule) applied to whatever model the wrapped strategy releases.

Why a wrapper and not Flower's ``FedAvgM``: ``FedAvgM`` folds the momentum into
its own ``aggregate_fit``, but under Paillier the mean is computed by
:class:`fedapp.secagg.PaillierSecureAggregation`, which must wrap plain FedAvg
(a sum is all it can compute). Applied outside it, the momentum only
post-processes the released model, so it costs no privacy: record-level
DP-FedSGD (:mod:`fedapp.dp_fedsgd`) gets the heavy-ball DP-SGD of the
centralised literature with each client still taking one plain step.

The update is FedAvgM's (Hsu et al. 2019): with ``g = x_t - mean`` the
pseudo-gradient, ``v = g`` in the first round and ``v = momentum * v + g``
after, and ``x_{t+1} = x_t - server_lr * v``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flwr.common import FitIns, NDArrays, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedapp.wrappers import Failures, FitResults, StrategyWrapper


class ServerMomentum(StrategyWrapper):
    """Heavy-ball momentum on the sequence of released global models.

    Parameters
    ----------
    strategy : Strategy
        Releases the new global model each round (e.g. Paillier around FedAvg).
    server_lr : float
        eta, the step along the momentum (default: 1.0).
    momentum : float
        mu in [0, 1) (default: 0.9).
    """

    def __init__(self, strategy: Strategy, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if server_lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need server_lr > 0 and 0 <= momentum < 1, got {server_lr}, {momentum}")
        super().__init__(strategy)
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: NDArrays | None = None
        self._current: NDArrays | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None or self._current is None:  # nothing released: the velocity waits too
            return params, metrics
        stepped = momentum_step(self._current, parameters_to_ndarrays(params), self.velocity,
                                server_lr=self.server_lr, momentum=self.momentum)
        self.velocity = stepped.velocity
        return ndarrays_to_parameters(stepped.weights), metrics

    def state_dict(self) -> dict[str, NDArrays | None]:
        """The velocity, for a checkpoint (a resumed run without it restarts the momentum)."""
        return {"velocity": None if self.velocity is None else [v.copy() for v in self.velocity]}

    def load_state_dict(self, state: dict[str, NDArrays | None]) -> None:
        velocity = state.get("velocity")
        self.velocity = None if velocity is None else [np.asarray(v) for v in velocity]


class MomentumStep(NamedTuple):
    """The next global model and the velocity that produced it."""

    weights: NDArrays
    velocity: NDArrays


def momentum_step(
    current: NDArrays, released: NDArrays, velocity: NDArrays | None, *, server_lr: float, momentum: float
) -> MomentumStep:
    """One FedAvgM step from ``current`` given the strategy's ``released`` model; arrays keep their dtype."""
    if len(current) != len(released):
        raise ValueError(f"released model has {len(released)} arrays, the current one {len(current)}")
    pseudo = [c.astype(np.float64) - r.astype(np.float64) for c, r in zip(current, released)]
    if velocity is None:
        new_velocity = pseudo
    else:
        new_velocity = [momentum * v + g for v, g in zip(velocity, pseudo)]
    weights = [(c - server_lr * v).astype(c.dtype) for c, v in zip(current, new_velocity)]
    return MomentumStep(weights, new_velocity)
