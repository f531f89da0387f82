"""Server-side anomaly detection, client reputation and quarantine, around any strategy.

Detection rule (each round, over the updates ``delta_i = w_i - w_global`` of the
round's ``n >= 3`` clients; floating-point arrays only, flattened):

1. three scores per client: the L2 norm ``||delta_i||``; the cosine similarity
   of ``delta_i`` to the coordinate-wise median update; the square root of its
   Krum score, the sum of squared distances to its ``max(1, n - f - 2)``
   nearest other updates (``f`` = the assumed number of Byzantine clients). The
   root keeps it in distance units like the norm: squared, a mildly long honest
   update would already look like an outlier;
2. each score becomes a robust z-score across the round's clients,
   ``(x - median) / max(1.4826 * MAD, floor)``. The floor keeps near-identical
   honest updates from making tiny deviations look extreme: 15 % of the median
   for the norm and the root Krum score, 0.1 for the cosine (so at the default
   threshold 3 a norm alone must be >= 45 % above the median to flag);
3. the anomaly score is the largest directional z: ``max(z_norm, -z_cosine,
   z_krum)`` (too long, pointing away from the median, or far from everyone;
   a short update is not suspicious on its own: it is what a client with little
   data sends). A client is flagged when it exceeds ``threshold``.

Because medians and MADs ignore a minority of outliers, fewer than half of the
round's clients can be flagged by one score, whatever the attackers send.

Reputation: ``r <- (1 - a) r + a * (0 if flagged else 1)``, starting at 1, with
``a = reputation_weight``, updated in the rounds a client takes part in. Below
``quarantine_below`` the client is quarantined: its node goes on the shared
:class:`~fedapp.exclusion.ExclusionList`, so Flower's sampling no longer picks it.
After ``release_after`` rounds away it is released on probation with
reputation exactly ``quarantine_below``, so one more flag sends it back. A
quarantine that would leave fewer than ``min_fit_clients`` samplable clients is
deferred (an event says so) instead of stalling the run.

Every decision is an event in ``events.jsonl``; every score a line in
``scores.jsonl``; the round's counts go into its row. ``ground_truth`` (the
simulated attackers) is used only to write precision and recall into the row:
it never influences a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Collection

import numpy as np
from flwr.common import FitIns, NDArrays, Parameters, Scalar, log, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedapp.exclusion import Exclusion, ExclusionList
from fedapp.metrics import RunRecorder
from fedapp.validation import MalformedUpdateError
from fedapp.wrappers import Failures, FitResults, StrategyWrapper, client_label

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation
NORM_FLOOR = 0.15  # scale floor for norm and root-Krum-score z, relative to the median
COSINE_FLOOR = 0.1  # scale floor for cosine z, absolute (honest cosines spread by ~0.1-0.2)
MIN_CLIENTS_TO_SCORE = 3
QUARANTINE_CODE = "quarantine"


def flat_update(weights: NDArrays, reference: NDArrays) -> np.ndarray:
    """``weights - reference`` over the floating-point arrays, as one float64 vector."""
    parts = [
        (np.asarray(w, dtype=np.float64) - np.asarray(r, dtype=np.float64)).ravel()
        for w, r in zip(weights, reference, strict=True)
        if np.issubdtype(np.asarray(r).dtype, np.floating)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def robust_z(values: np.ndarray, floor: float) -> np.ndarray:
    """``(x - median) / max(1.4826 * MAD, floor)``: a z-score that outliers cannot inflate."""
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    return (values - median) / max(MAD_TO_STD * mad, floor, 1e-12)


def cosine_to_median(updates: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``updates`` (n x d) to their coordinate-wise median."""
    median = np.median(updates, axis=0)
    norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(median)
    return np.divide(updates @ median, norms, out=np.zeros(len(updates)), where=norms > 0)


def krum_scores(updates: np.ndarray, num_malicious: int) -> np.ndarray:
    """Blanchard et al.'s score: squared distances to the ``max(1, n - f - 2)`` nearest others.

    Same neighbour count as Flower's ``aggregate_krum``; small = well surrounded.
    """
    sq = np.sum(updates**2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * updates @ updates.T, 0.0)
    k = max(1, len(updates) - num_malicious - 2)
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, :k].sum(axis=1)


@dataclass(frozen=True)
class UpdateScore:
    """One client's scores in one round, and whether (and why) it was flagged."""

    norm: float
    cosine: float
    krum: float
    z_norm: float
    z_cosine: float
    z_krum: float
    anomaly: float
    flagged: bool
    reason: str


def score_updates(updates: np.ndarray, *, num_malicious: int, threshold: float) -> list[UpdateScore]:
    """Score the rows of ``updates`` (n x d, one client each) by the module's rule."""
    norms = np.linalg.norm(updates, axis=1)
    cosines = cosine_to_median(updates)
    krum = np.sqrt(krum_scores(updates, num_malicious))
    z_norm = robust_z(norms, NORM_FLOOR * float(np.median(norms)))
    z_cos = robust_z(cosines, COSINE_FLOOR)
    z_krum = robust_z(krum, NORM_FLOOR * float(np.median(krum)))
    out = []
    for i in range(len(updates)):
        parts = {"norm": z_norm[i], "cosine": -z_cos[i], "krum": z_krum[i]}
        anomaly = float(max(parts.values()))
        over = [f"{name} z={value:.1f}" for name, value in parts.items() if value > threshold]
        reason = f"{', '.join(over)} > {threshold:g}" if over else ""
        out.append(
            UpdateScore(
                float(norms[i]), float(cosines[i]), float(krum[i]), float(z_norm[i]), float(z_cos[i]),
                float(z_krum[i]), anomaly, anomaly > threshold, reason,
            )
        )
    return out


def precision_recall(flagged: Collection[str], malicious: Collection[str]) -> tuple[float | None, float | None]:
    """Precision and recall of ``flagged`` against ``malicious``; None where undefined (0/0)."""
    hits = len(set(flagged) & set(malicious))
    precision = hits / len(flagged) if flagged else None
    recall = hits / len(malicious) if malicious else None
    return precision, recall


class AnomalyQuarantine(StrategyWrapper):
    """Score every update, keep reputations, quarantine and release clients; any base rule.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy (any aggregation rule that sees plain updates).
    min_fit_clients : int
        Fewest samplable clients a round needs; quarantine never goes below it.
    threshold : float
        Robust z-score above which a score flags (default: 3.0).
    reputation_weight : float
        Weight of the newest round in the reputation average (default: 0.5).
    quarantine_below : float
        Reputation under which a client is quarantined (default: 0.4).
    release_after : int
        Rounds in quarantine before release on probation; 0 = never (default: 5).
    drop_flagged : bool
        Leave flagged updates out of this round's aggregate (at most ``(n - 1) // 2``,
        the most anomalous first) (default: True).
    num_malicious : int
        f in the Krum score's ``n - f - 2`` neighbours (default: 0).
    excluded : ExclusionList | None
        The exclusion list shared with :class:`~fedapp.exclusion.ClientExclusion`
        (default: a new one).
    recorder : RunRecorder | None
        Where events, scores and round counts go (default: None, log only).
    ground_truth : Collection[str] | None
        Labels of the simulated attackers, for precision/recall only (default: None).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        min_fit_clients: int,
        threshold: float = 3.0,
        reputation_weight: float = 0.5,
        quarantine_below: float = 0.4,
        release_after: int = 5,
        drop_flagged: bool = True,
        num_malicious: int = 0,
        excluded: ExclusionList | None = None,
        recorder: RunRecorder | None = None,
        ground_truth: Collection[str] | None = None,
    ) -> None:
        super().__init__(strategy)
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0 < reputation_weight <= 1:
            raise ValueError(f"reputation_weight must be in (0, 1], got {reputation_weight}")
        if not 0 <= quarantine_below < 1:
            raise ValueError(f"quarantine_below must be in [0, 1), got {quarantine_below}")
        if release_after < 0 or min_fit_clients < 1 or num_malicious < 0:
            raise ValueError(
                f"need release_after >= 0, min_fit_clients >= 1, num_malicious >= 0; got "
                f"{release_after}, {min_fit_clients}, {num_malicious}"
            )
        self.min_fit_clients = min_fit_clients
        self.threshold = threshold
        self.reputation_weight = reputation_weight
        self.quarantine_below = quarantine_below
        self.release_after = release_after
        self.drop_flagged = drop_flagged
        self.num_malicious = num_malicious
        self.excluded = excluded if excluded is not None else ExclusionList()
        self.recorder = recorder
        self.ground_truth = frozenset(ground_truth or ())
        self.reputation: dict[str, float] = {}
        self.quarantined: dict[str, tuple[str, int]] = {}  # client label -> (node id, round quarantined)
        self._global: NDArrays = []
        self._available = 0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        self._release_due(server_round)
        self._available = client_manager.num_available()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._count_refusals(server_round, failures)
        if len(results) < MIN_CLIENTS_TO_SCORE or not self._global:
            log(INFO, "Round %s: %s update(s), too few to score; detection skipped", server_round, len(results))
            self._event("detection_skipped", server_round, f"{len(results)} update(s); scoring needs >= {MIN_CLIENTS_TO_SCORE}")
            return super().aggregate_fit(server_round, results, failures)
        labels = [client_label(proxy, res) for proxy, res in results]
        updates = np.stack([flat_update(parameters_to_ndarrays(res.parameters), self._global) for _, res in results])
        scores = score_updates(updates, num_malicious=self.num_malicious, threshold=self.threshold)
        flagged = [label for label, s in zip(labels, scores) if s.flagged]
        for (proxy, _), label, s in zip(results, labels, scores):
            self._update_reputation(server_round, proxy, label, s)
        self._quarantine_due(server_round, {label: proxy.cid for (proxy, _), label in zip(results, labels)})
        kept = self._without_flagged(server_round, results, labels, scores)
        self._record_round(server_round, labels, flagged, len(results) - len(kept))
        return super().aggregate_fit(server_round, kept, failures)

    def _count_refusals(self, server_round: int, failures: Failures) -> None:
        """An update that validation refused (absurd norm, replay, malformed) counts as a flag against its sender."""
        nodes: dict[str, str] = {}
        for failure in failures:
            if isinstance(failure, MalformedUpdateError) and failure.proxy is not None and failure.client is not None:
                nan = float("nan")
                score = UpdateScore(nan, nan, nan, nan, nan, nan, nan, True, f"refused by validation: {failure.reason}")
                self._update_reputation(server_round, failure.proxy, failure.client, score)
                nodes[failure.client] = failure.proxy.cid
        if nodes:
            self._quarantine_due(server_round, nodes)

    def _update_reputation(self, server_round: int, proxy: ClientProxy, label: str, s: UpdateScore) -> None:
        a = self.reputation_weight
        rep = (1 - a) * self.reputation.get(label, 1.0) + a * (0.0 if s.flagged else 1.0)
        self.reputation[label] = rep
        if self.recorder:
            self.recorder.score(
                server_round, label, norm=s.norm, cosine=s.cosine, krum=s.krum, z_norm=s.z_norm,
                z_cosine=s.z_cosine, z_krum=s.z_krum, anomaly=s.anomaly, flagged=s.flagged, reputation=rep,
            )
        if s.flagged:
            log(INFO, "Round %s: client %s flagged (%s); reputation %.3f", server_round, label, s.reason, rep)
            self._event("client_flagged", server_round, s.reason, client=label, anomaly=s.anomaly, reputation=rep)

    def _quarantine_due(self, server_round: int, nodes: dict[str, str]) -> None:
        """Quarantine this round's clients whose reputation fell below the threshold, lowest first."""
        due = sorted(
            (rep, label) for label, rep in self.reputation.items()
            if rep < self.quarantine_below and label in nodes and label not in self.quarantined
        )
        for rep, label in due:
            node = nodes[label]
            if node in self.excluded:  # already excluded for another reason (e.g. privacy budget)
                continue
            left = self._available - 1
            if left < self.min_fit_clients:
                reason = (
                    f"reputation {rep:.3f} < {self.quarantine_below:g}, but quarantine would leave {left} "
                    f"samplable client(s), fewer than strategy.min_fit_clients={self.min_fit_clients}; deferred"
                )
                log(WARNING, "Round %s: client %s: %s", server_round, label, reason)
                self._event("quarantine_deferred", server_round, reason, client=label, reputation=rep)
                continue
            reason = f"reputation {rep:.3f} < {self.quarantine_below:g}"
            if self.release_after:
                reason += f"; release on probation after {self.release_after} round(s)"
            self.excluded.add(Exclusion(node, label, server_round, QUARANTINE_CODE, reason))
            self.quarantined[label] = (node, server_round)
            self._available = left
            log(INFO, "Round %s: client %s quarantined (%s)", server_round, label, reason)
            self._event("client_quarantined", server_round, reason, client=label, reputation=rep)

    def _release_due(self, server_round: int) -> None:
        """Release clients that have sat out ``release_after`` rounds, on probation."""
        if not self.release_after:
            return
        for label, (node, since) in list(self.quarantined.items()):
            if server_round - since <= self.release_after:
                continue
            self.excluded.remove(self.excluded.node_of(label) or node)  # its node id may have been re-bound
            del self.quarantined[label]
            self.reputation[label] = self.quarantine_below
            reason = (
                f"quarantined in round {since}, released after {self.release_after} round(s) on probation "
                f"(reputation {self.quarantine_below:g}: one more flag quarantines it again)"
            )
            log(INFO, "Round %s: client %s released (%s)", server_round, label, reason)
            self._event("client_released", server_round, reason, client=label)

    def _without_flagged(
        self, server_round: int, results: FitResults, labels: list[str], scores: list[UpdateScore]
    ) -> FitResults:
        if not self.drop_flagged:
            return results
        ranked = sorted((i for i, s in enumerate(scores) if s.flagged), key=lambda i: -scores[i].anomaly)
        dropped = set(ranked[: (len(results) - 1) // 2])
        for i in sorted(dropped):
            self._event("update_dropped", server_round, f"flagged: {scores[i].reason}", client=labels[i],
                        node_id=results[i][0].cid)  # fmt: skip
        return [r for i, r in enumerate(results) if i not in dropped]

    def _record_round(self, server_round: int, labels: list[str], flagged: list[str], dropped: int) -> None:
        if not self.recorder:
            return
        row: dict[str, object] = {"flagged": len(flagged), "dropped_updates": dropped, "quarantined": len(self.quarantined)}
        if self.ground_truth:
            present = self.ground_truth & set(labels)
            precision, recall = precision_recall(flagged, present)
            q_precision, q_recall = precision_recall(list(self.quarantined), self.ground_truth)
            row |= {
                "detect_precision": precision,
                "detect_recall": recall,
                "malicious_sampled": len(present),
                "quarantine_precision": q_precision,
                "quarantine_recall": q_recall,
            }
        self.recorder.record(server_round, **row)

    def state_dict(self) -> dict[str, object]:
        """Reputations and quarantines (the exclusion list itself is saved by :class:`ClientExclusion`)."""
        return {
            "reputation": dict(self.reputation),
            "quarantined": {label: [node, since] for label, (node, since) in self.quarantined.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.reputation = {str(k): float(v) for k, v in state["reputation"].items()}  # type: ignore[union-attr]
        self.quarantined = {
            str(label): (str(node), int(since)) for label, (node, since) in state["quarantined"].items()  # type: ignore[union-attr]
        }

    def _event(self, kind: str, server_round: int, reason: str, **fields: object) -> None:
        if self.recorder:
            self.recorder.event(kind, server_round, reason, **fields)
