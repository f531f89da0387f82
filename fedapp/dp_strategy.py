"""Server side of differential privacy: central and distributed (user-level) DP, epsilon reporting.

Central DP is Flower's own :class:`DifferentialPrivacyServerSideFixedClipping`
(clip each client's update to norm C, add Gaussian noise of standard deviation
``sigma * C / m`` to the mean of ``m`` sampled updates) around FedAvg.
:class:`CentralDPAccounting` sits outside it and adds what Flower leaves out:
uniform weights (the noise is calibrated to a plain mean, not a sample-weighted
one) and a user-level ledger, one Poisson-subsampled Gaussian step per round at
q = clients per round / clients (Opacus RDP), recorded every round.

Distributed DP is the secure-aggregation counterpart: under Paillier each client
clips its update to C and adds a noise share ``N(0, sigma_total^2 / n)`` before
encrypting (``fedapp.crypto``), so a decrypted sum of ``k`` updates carries noise
of standard deviation ``sigma_total * sqrt(k / n)`` without any party trusted to
add it. :class:`DistributedDPAccounting` sits directly outside
``PaillierSecureAggregation`` and books one Gaussian step per released round at
the noise multiplier of the ``k`` contributors actually in the sum
(:func:`distributed_noise_multiplier`).

Both wrappers keep their books in a :class:`UserLevelLedger`.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from logging import INFO

import numpy as np
from flwr.common import Parameters, Scalar, log
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedapp.metrics import RunRecorder
from fedapp.privacy import PrivacyLedger
from fedapp.wrappers import EPSILON_KEY, Failures, FitResults, StrategyWrapper

CONTRIBUTORS_KEY = "secagg_contributors"  # PaillierSecureAggregation's metric: updates in the decrypted sum


class UserLevelLedger:
    """User-level privacy spend of the released models: one subsampled Gaussian step per round.

    Parameters
    ----------
    sample_rate : float
        q, the probability that a given client takes part in a round, in (0, 1].
    delta : float
        The delta at which epsilon is reported, in (0, 1).
    accountant : str
        Opacus accounting mechanism (default: ``"rdp"``).
    """

    def __init__(self, *, sample_rate: float, delta: float, accountant: str = "rdp") -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.sample_rate = sample_rate
        self.delta = delta
        self.ledger = PrivacyLedger(accountant)

    def spend(self, noise_multiplier: float) -> float:
        """Book one released round at ``noise_multiplier`` (noise std / sensitivity); epsilon so far."""
        if noise_multiplier <= 0:
            raise ValueError(f"a released round needs noise_multiplier > 0, got {noise_multiplier}")
        self.ledger.record(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate, steps=1)
        return self.ledger.epsilon(self.delta)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0 before any round)."""
        return self.ledger.epsilon(self.delta)

    def state_dict(self) -> dict[str, object]:
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.ledger.load_state_dict(state)

    def __repr__(self) -> str:
        return f"UserLevelLedger(q={self.sample_rate:g}, delta={self.delta:g}, {self.ledger!r})"


def client_sample_rate(num_sampled_clients: int, num_clients: int) -> float:
    """q = m / N, the chance that a given client is in a round's sample; refuses impossible counts."""
    if not 0 < num_sampled_clients <= num_clients:
        raise ValueError(f"need 0 < num_sampled_clients <= num_clients, got {num_sampled_clients}, {num_clients}")
    return num_sampled_clients / num_clients


def distributed_noise_multiplier(
    noise_sigma_total: float, *, contributors: int, calibrated_for: int, clip_norm: float
) -> float:
    """z of a decrypted sum of ``k = contributors`` noise shares, each ``N(0, sigma_total^2 / n)``.

    The sum carries noise of standard deviation ``sigma_total * sqrt(k / n)``;
    one client's clipped update moves it by at most ``clip_norm``, so
    ``z = sigma_total * sqrt(k / n) / clip_norm``. Fewer contributors than the
    ``n = calibrated_for`` the shares were sized for means less noise.
    """
    if not 0 < contributors <= calibrated_for:
        raise ValueError(f"need 0 < contributors <= calibrated_for, got {contributors}, {calibrated_for}")
    if noise_sigma_total <= 0 or clip_norm <= 0:
        raise ValueError(f"need noise_sigma_total > 0 and clip_norm > 0, got {noise_sigma_total}, {clip_norm}")
    return noise_sigma_total * math.sqrt(contributors / calibrated_for) / clip_norm


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
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0 for central DP, got {noise_multiplier}")
        super().__init__(
            DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        )
        self.noise_multiplier = noise_multiplier
        self.num_sampled_clients = num_sampled_clients
        self.ledger = UserLevelLedger(sample_rate=client_sample_rate(num_sampled_clients, num_clients), delta=delta)
        self.recorder = recorder

    def state_dict(self) -> dict[str, object]:
        """The accountant's history: a resumed run goes on spending from where it stopped."""
        return {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.ledger.load_state_dict(state["ledger"])  # type: ignore[arg-type]

    def book_release(self, scope: str, noise_multiplier: float) -> None:
        """Book a release logged before a crash (a resumed run replays the audit log's spends)."""
        if scope == "central_epsilon":
            self.ledger.spend(noise_multiplier)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Flower's fixed-clipping wrapper draws its noise from numpy's global generator, whose state a
        # checkpoint or a guess could reveal; reseed it from the OS so no saved state predicts this noise.
        np.random.seed(np.frombuffer(os.urandom(64), dtype=np.uint32))
        params, metrics = super().aggregate_fit(server_round, uniform_weights(results), failures)
        if params is None:  # nothing released, nothing spent
            return params, metrics
        # Noise is sigma*C/m but a mean of k < m updates has sensitivity C/k: effective sigma*k/m.
        effective_sigma = self.noise_multiplier * len(results) / self.num_sampled_clients
        epsilon = self.ledger.spend(effective_sigma)
        log(
            INFO, "Round %s: central DP (user-level) epsilon %.3f at delta %g", server_round, epsilon, self.ledger.delta
        )
        if self.recorder:
            self.recorder.record(
                server_round, central_epsilon=epsilon, central_noise_multiplier=effective_sigma, dp_mode="central"
            )
        return params, {**metrics, "central_epsilon": epsilon}


def _ledger_state(ledger: UserLevelLedger | None) -> dict[str, object] | None:
    return None if ledger is None else ledger.state_dict()


class DistributedDPAccounting(StrategyWrapper):
    """User-level accounting of the noise shares Paillier clients add before encrypting.

    Wraps ``PaillierSecureAggregation`` directly (it reports how many updates,
    ``k``, the decrypted sum holds). Per released round one Gaussian step at
    :func:`distributed_noise_multiplier` of the actual ``k``; a round that
    releases nothing spends nothing. Sensitivity ``clip_norm``: each client's
    update enters the sum with weight 1 (``secagg.max_weight = 1``).

    Two epsilons. ``central_epsilon`` is against the honest-but-curious server,
    which sees only the noisy sum but chooses who takes part, so client sampling
    buys it nothing (q = 1). ``released_epsilon`` (only when fewer than all
    clients are sampled) is against whoever sees only the released models and
    not who took part: Poisson-subsampled at q = m / num_clients, as central DP.

    Parameters
    ----------
    strategy : Strategy
        ``PaillierSecureAggregation`` around FedAvg.
    noise_sigma_total : float
        Standard deviation of the noise in a sum of all ``calibrated_for`` shares.
    clip_norm : float
        C, the L2 clip of every client's update.
    calibrated_for : int
        n, the number of shares ``noise_sigma_total`` was split into.
    num_sampled_clients : int
        m, clients sampled per round.
    num_clients : int
        Population size.
    delta : float
        The delta at which epsilon is reported.
    recorder : RunRecorder | None
        Receives the epsilons in each round's row (default: None).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_sigma_total: float,
        clip_norm: float,
        calibrated_for: int,
        num_sampled_clients: int,
        num_clients: int,
        delta: float,
        recorder: RunRecorder | None = None,
    ) -> None:
        if calibrated_for < 1:
            raise ValueError(f"calibrated_for must be >= 1, got {calibrated_for}")
        distributed_noise_multiplier(noise_sigma_total, contributors=1, calibrated_for=1, clip_norm=clip_norm)
        super().__init__(strategy)
        self.noise_sigma_total = noise_sigma_total
        self.clip_norm = clip_norm
        self.calibrated_for = calibrated_for
        self.ledger = UserLevelLedger(sample_rate=1.0, delta=delta)
        sample_rate = client_sample_rate(num_sampled_clients, num_clients)
        self.released = UserLevelLedger(sample_rate=sample_rate, delta=delta) if sample_rate < 1 else None
        self.recorder = recorder

    def state_dict(self) -> dict[str, object]:
        """Both accountants' histories (against the server, and of the released models)."""
        return {"ledger": self.ledger.state_dict(), "released": _ledger_state(self.released)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.ledger.load_state_dict(state["ledger"])  # type: ignore[arg-type]
        if self.released is not None:
            if state.get("released") is None:
                raise ValueError("the checkpoint has no history for the released-model accountant this run keeps")
            self.released.load_state_dict(state["released"])  # type: ignore[arg-type]

    def book_release(self, scope: str, noise_multiplier: float) -> None:
        """Book a release logged before a crash (a resumed run replays the audit log's spends)."""
        if scope == "central_epsilon":
            self.ledger.spend(noise_multiplier)
        elif scope == "released_epsilon" and self.released is not None:
            self.released.spend(noise_multiplier)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:  # nothing released, nothing spent
            return params, metrics
        if CONTRIBUTORS_KEY not in metrics:
            raise RuntimeError(
                f"{type(self.strategy).__name__} released a model without reporting {CONTRIBUTORS_KEY!r}: "
                "distributed DP must wrap PaillierSecureAggregation directly"
            )
        contributors = int(metrics[CONTRIBUTORS_KEY])
        z = distributed_noise_multiplier(
            self.noise_sigma_total, contributors=contributors, calibrated_for=self.calibrated_for,
            clip_norm=self.clip_norm,
        )
        epsilon = self.ledger.spend(z)
        row: dict[str, Scalar] = {"central_epsilon": epsilon}
        if self.released is not None:
            row["released_epsilon"] = self.released.spend(z)
        log(
            INFO,
            "Round %s: distributed DP (user-level, against the server) epsilon %.3f at delta %g: "
            "%d of %d noise shares in the sum, noise multiplier %.3f",
            server_round, epsilon, self.ledger.delta, contributors, self.calibrated_for, z,
        )
        if self.recorder:
            self.recorder.record(server_round, **row, distributed_noise_multiplier=z, dp_mode="distributed")
        return params, {**metrics, **row}


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
