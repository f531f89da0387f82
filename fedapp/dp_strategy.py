"""Server side of differential privacy: central (user-level) DP and epsilon reporting.

Central DP is Flower's own :class:`DifferentialPrivacyServerSideFixedClipping`
(clip each client's update to norm C, add Gaussian noise of standard deviation
``sigma * C / m`` to the mean of ``m`` sampled updates) around FedAvg.
:class:`CentralDPAccounting` sits outside it and adds what Flower leaves out:
uniform weights (the noise is calibrated to a plain mean, not a sample-weighted
one) and a user-level ledger, one Poisson-subsampled Gaussian step per round at
q = clients per round / clients (Opacus RDP), recorded every round.
"""

from __future__ import annotations

from dataclasses import replace
from logging import INFO

from flwr.common import Parameters, Scalar, log
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedapp.metrics import RunRecorder
from fedapp.privacy import PrivacyLedger
from fedapp.wrappers import EPSILON_KEY, Failures, FitResults, StrategyWrapper


class CentralDPAccounting(StrategyWrapper):
    """Flower's server-side fixed-clipping DP around ``strategy``, with user-level accounting.

    Parameters
    ----------
    strategy : Strategy
        The aggregation rule; FedAvg (a mean is what the noise is calibrated for).
    noise_multiplier : float
        sigma, noise standard deviation in units of ``clipping_norm / m``.
    clipping_norm : float
        C, bound on each client update's L2 norm.
    num_sampled_clients : int
        m, clients sampled per round.
    num_clients : int
        Population size; q = m / num_clients.
    delta : float
        The delta at which epsilon is reported.
    recorder : RunRecorder | None
        Receives ``central_epsilon`` in each round's row (default: None).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        num_clients: int,
        delta: float,
        recorder: RunRecorder | None = None,
    ) -> None:
        if not 0 < num_sampled_clients <= num_clients:
            raise ValueError(f"need 0 < num_sampled_clients <= num_clients, got {num_sampled_clients}, {num_clients}")
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0 for central DP, got {noise_multiplier}")
        super().__init__(
            DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        )
        self.noise_multiplier = noise_multiplier
        self.num_sampled_clients = num_sampled_clients
        self.sample_rate = num_sampled_clients / num_clients
        self.delta = delta
        self.recorder = recorder
        self.ledger = PrivacyLedger("rdp")

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = super().aggregate_fit(server_round, uniform_weights(results), failures)
        if params is None:  # nothing released, nothing spent
            return params, metrics
        # Noise is sigma*C/m but a mean of k < m updates has sensitivity C/k: effective sigma*k/m.
        effective_sigma = self.noise_multiplier * len(results) / self.num_sampled_clients
        self.ledger.record(noise_multiplier=effective_sigma, sample_rate=self.sample_rate, steps=1)
        epsilon = self.ledger.epsilon(self.delta)
        log(INFO, "Round %s: central DP (user-level) epsilon %.3f at delta %g", server_round, epsilon, self.delta)
        if self.recorder:
            self.recorder.record(
                server_round, central_epsilon=epsilon, central_noise_multiplier=effective_sigma
            )
        return params, {**metrics, "central_epsilon": epsilon}


class ClientEpsilonRecording(StrategyWrapper):
    """Put the max and mean of the clients' cumulative DP-SGD epsilon into each round's row.

    Per-client values already reach ``clients.jsonl`` (every reported metric does).
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder) -> None:
        super().__init__(strategy)
        self.recorder = recorder

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        epsilons = [float(res.metrics[EPSILON_KEY]) for _, res in results if EPSILON_KEY in res.metrics]
        if epsilons:
            self.recorder.record(
                server_round, epsilon_max=max(epsilons), epsilon_mean=sum(epsilons) / len(epsilons)
            )
        return super().aggregate_fit(server_round, results, failures)


def uniform_weights(results: FitResults) -> FitResults:
    """Results with ``num_examples = 1`` each, so FedAvg takes the plain mean DP assumes."""
    return [(proxy, replace(res, num_examples=1)) for proxy, res in results]
