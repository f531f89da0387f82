"""Server side of Paillier secure aggregation around FedAvg (legacy strategy API).

:class:`PaillierSecureAggregation` holds the public key only (asserted at
construction). It asks clients for encrypted updates, validates and adds the
ciphertexts, and has the sum decrypted by a few key-holding decryptor clients.

Why a decryption sub-round inside ``aggregate_fit`` (and not in the next
round's ``configure_fit``): the threat model lets the server learn the
aggregate, and with the plaintext mean back on the server everything after
aggregation stays as in plain FedAvg -- central evaluation, checkpoints, the
wrappers outside this one. The legacy workflow hands ``aggregate_fit`` the
clients' ``GridClientProxy`` objects, whose ``fit`` sends one message and waits
for the reply, so the sub-round needs no change to Flower's round loop. The
alternative (each client decrypts the sum at the start of the next round) would
hide even the global model from the server, at the price of central evaluation
and of every client paying the decryption. Decryptors are cross-checked: the
``decryptors`` replies must be identical (decryption is deterministic); they
are asked concurrently, and one that fails is replaced by the next contributor.
"""

from __future__ import annotations

import random
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from logging import INFO, WARNING

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from fedapp.crypto import (
    CiphertextRejected,
    EncryptedVector,
    LayoutError,
    PublicKey,
    ReplayGuard,
    add_encrypted,
    assert_no_private_key,
)
from fedapp.crypto.protocol import (
    MODE_DECRYPT,
    SECAGG_SHARE_INDEX,
    combine_threshold,
    decode_partials,
    MODE_ENCRYPT,
    SECAGG_KEY_ID,
    SECAGG_MODE,
    SECAGG_ROUND,
    SECAGG_TOTAL_WEIGHT,
    SecAggSettings,
    decode_decrypted,
    flatten,
    unflatten,
)
from fedapp.crypto.threshold import ThresholdParams
from fedapp.metrics import RunRecorder
from fedapp.wrappers import Failures, FitResults, StrategyWrapper, client_label


def integer_weights(num_examples: list[int], max_weight: int) -> list[int]:
    """FedAvg's sample weights on ``1..max_weight`` (1 = plain mean), so slots keep their headroom."""
    if max_weight == 1:
        return [1] * len(num_examples)
    top = max(num_examples)
    return [max(1, round(max_weight * n / top)) for n in num_examples]


class PaillierSecureAggregation(StrategyWrapper):
    """FedAvg over Paillier-encrypted updates; the server never holds the private key.

    Parameters
    ----------
    strategy : FedAvg
        The base rule; only plain FedAvg (a sum is all Paillier can compute).
    public_key : PublicKey
        The clients' shared public key.
    settings : SecAggSettings
        Layout and quantiser (the clients use the same).
    decryptors : int
        Clients that decrypt the sum and must agree (default: 2).
    timeout : float | None
        Seconds to wait for a decryptor (default: None).
    seed : int
        Seeds the choice of decryptors (default: 0).
    threshold : ThresholdParams | None
        With threshold keys (``python -m fedapp.keys deal``), no client holds
        the whole private key: ``max(t, decryptors)`` clients each return a
        partial decryption of the sum they recomputed from the signed updates,
        and the server combines ``t`` of them (default: None, the legacy
        single-key mode in which every client holds the private key).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        public_key: PublicKey,
        settings: SecAggSettings,
        decryptors: int = 2,
        timeout: float | None = None,
        seed: int = 0,
        threshold: ThresholdParams | None = None,
        recorder: RunRecorder | None = None,
    ) -> None:
        if type(strategy) is not FedAvg:
            raise TypeError(
                f"Paillier secure aggregation wraps plain FedAvg, got {type(strategy).__name__}: Krum, trimmed "
                "mean and median need the individual updates, which the server never sees"
            )
        if decryptors < 1:
            raise ValueError(f"decryptors must be >= 1, got {decryptors}")
        super().__init__(strategy)
        self.public_key = public_key
        self.settings = settings
        self.decryptors = decryptors
        self.timeout = timeout
        self._rng = random.Random(seed)
        self._replay_guard = ReplayGuard()
        self._global: list[np.ndarray] | None = None
        self.threshold = threshold
        self.recorder = recorder  # refusals become ``ciphertext_rejected`` events (the round's failure accounting)
        self._signed: dict[str, list[np.ndarray]] = {}
        if threshold is not None and threshold.key_id != public_key.key_id:
            raise ValueError(f"threshold parameters are for key {threshold.key_id}, not {public_key.key_id}")
        assert_no_private_key(self)

    def state_dict(self) -> dict[str, object]:
        """The decryptor-choice RNG and the nonces already seen (a replay across a resume is still a replay)."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "seen": sorted(list(t) for t in self._replay_guard.seen)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        version, internal, gauss = state["rng"]  # type: ignore[misc]
        self._rng.setstate((version, tuple(internal), gauss))
        self._replay_guard.seen = {(str(k), str(n)) for k, n in state["seen"]}  # type: ignore[union-attr]

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        extra = {SECAGG_MODE: MODE_ENCRYPT, SECAGG_ROUND: server_round, SECAGG_KEY_ID: self.public_key.key_id}
        return [
            (proxy, FitIns(ins.parameters, {**ins.config, **extra}))
            for proxy, ins in self.strategy.configure_fit(server_round, parameters, client_manager)
        ]

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self._global is None:
            raise RuntimeError("aggregate_fit before configure_fit: no global model to update")
        num_values = int(sum(a.size for a in self._global))
        failures = list(failures)
        accepted: list[tuple[ClientProxy, FitRes, EncryptedVector]] = []
        for proxy, res in results:
            try:
                try:
                    arrays = parameters_to_ndarrays(res.parameters)
                except Exception as err:  # noqa: BLE001 - bytes that do not decode are the client's fault
                    raise CiphertextRejected("malformed", f"undecodable ({type(err).__name__})") from None
                expected = 2 if self.threshold is not None else 1
                if len(arrays) != expected:
                    raise CiphertextRejected(
                        "malformed", f"{len(arrays)} arrays, expected {expected} (encrypted vector[, signature])"
                    )
                msg = EncryptedVector.from_bytes(
                    arrays[0], self.public_key, expected_round=server_round, expected_num_values=num_values,
                    expected_layout=self.settings.layout, replay_guard=self._replay_guard,
                )
                if msg.kind != "update":
                    raise CiphertextRejected("not_an_update", f"a client sent a {msg.kind!r}")
            except CiphertextRejected as err:
                who = client_label(proxy, res)
                log(WARNING, "Round %s: update from client %s refused: %s", server_round, who, err)
                if self.recorder is not None:
                    self.recorder.event("ciphertext_rejected", server_round, str(err), client=who, node_id=proxy.cid)
                failures.append(err)
                continue
            accepted.append((proxy, res, msg))
            self._signed[msg.sender] = arrays
        if not accepted or (not self.strategy.accept_failures and failures):
            return None, {}
        if self.threshold is not None:  # decryptors recompute the sum from the signed updates, unweighted
            weights = [1] * len(accepted)
        else:
            weights = integer_weights([res.num_examples for _, res, _ in accepted], self.settings.layout.max_weight)
        try:
            aggregate = add_encrypted([m for _, _, m in accepted], self.public_key, weights=weights)
        except (LayoutError, CiphertextRejected) as err:
            log(WARNING, "Round %s: cannot add the encrypted updates: %s", server_round, err)
            return None, {}
        candidates = [proxy for proxy, _, _ in accepted]
        if self.threshold is not None:
            signed = [a for _, _, m in accepted for a in self._signed[m.sender]]
            decrypted = self._threshold_decrypt(server_round, aggregate, signed, candidates)
        else:
            decrypted = self._decrypt(server_round, aggregate, candidates)
        self._signed.clear()
        if decrypted is None:
            return None, {}
        total, weight = decrypted
        mean = flatten(self._global) + total / weight
        metrics: dict[str, Scalar] = {"secagg_contributors": len(accepted), "secagg_refused": len(results) - len(accepted)}
        if self.strategy.fit_metrics_aggregation_fn is not None:
            metrics |= self.strategy.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res, _ in accepted])
        return ndarrays_to_parameters(unflatten(mean, self._global)), metrics

    def _decrypt(
        self, server_round: int, aggregate: EncryptedVector, candidates: list[ClientProxy]
    ) -> tuple[np.ndarray, int] | None:
        """Ask ``decryptors`` clients at once; replace any that fail; the replies must agree.

        Concurrent, because each decryptor pays a full decryption (about 1 s for
        cnn_mnist_small at 2048 bits) and asking them one after the other would
        put every one of those seconds on the round's critical path.
        """
        ins = FitIns(
            ndarrays_to_parameters([aggregate.to_ndarray(self.public_key)]),
            {SECAGG_MODE: MODE_DECRYPT, SECAGG_ROUND: server_round, SECAGG_KEY_ID: self.public_key.key_id},
        )
        order = list(candidates)
        self._rng.shuffle(order)
        waiting = iter(order)
        replies: list[tuple[str, np.ndarray, int]] = []

        def ask(proxy: ClientProxy) -> tuple[str, np.ndarray, int]:
            res = proxy.fit(ins, timeout=self.timeout, group_id=server_round)
            arrays = parameters_to_ndarrays(res.parameters)
            weight = int(res.metrics[SECAGG_TOTAL_WEIGHT])
            if len(arrays) != 1:
                raise CiphertextRejected("malformed", f"decryptor replied {len(arrays)} arrays, expected one")
            total = decode_decrypted(arrays[0], weight, num_values=aggregate.num_values, settings=self.settings)
            return proxy.cid, total, weight

        with ThreadPoolExecutor(max_workers=self.decryptors, thread_name_prefix="decryptor") as pool:
            pending = {pool.submit(ask, proxy): proxy for proxy in islice(waiting, self.decryptors)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    proxy = pending.pop(future)
                    try:
                        replies.append(future.result())
                    except Exception as err:  # noqa: BLE001 - a failed decryptor is replaced, not fatal
                        log(WARNING, "Round %s: decryptor %s failed (%s); trying another", server_round, proxy.cid, err)
                        replacement = next(waiting, None)
                        if replacement is not None:
                            pending[pool.submit(ask, replacement)] = replacement
        if not replies:
            log(WARNING, "Round %s: no decryptor answered; the round is skipped", server_round)
            return None
        if len(replies) < self.decryptors:
            log(WARNING, "Round %s: only %d of %d decryptors answered", server_round, len(replies), self.decryptors)
        first_cid, total, weight = replies[0]
        for cid, other, other_weight in replies[1:]:
            if other_weight != weight or not np.array_equal(other, total):
                log(WARNING, "Round %s: decryptors %s and %s disagree; the round is skipped", server_round, first_cid, cid)
                return None
        if weight != aggregate.weight:
            log(WARNING, "Round %s: decrypted weight %s != %s; the round is skipped", server_round, weight, aggregate.weight)
            return None
        log(INFO, "Round %s: sum of %d encrypted updates decrypted by %s", server_round,
            len(aggregate.contributors), [cid for cid, _, _ in replies])
        return total, weight

    def _threshold_decrypt(
        self, server_round: int, aggregate: EncryptedVector, signed: list[np.ndarray], candidates: list[ClientProxy]
    ) -> tuple[np.ndarray, int] | None:
        """Partial decryptions from ``max(t, decryptors)`` clients, combined ``t`` at a time; subsets must agree.

        Each decryptor gets the signed updates (not the sum) and checks and adds
        them itself (:func:`fedapp.crypto.protocol.threshold_partial_decrypt`).
        Asked concurrently; a failing decryptor is replaced by the next
        contributor. With more than ``t`` replies, a second ``t``-subset is
        combined as a cross-check (a wrong partial changes the plaintext).
        """
        assert self.threshold is not None
        t = self.threshold.threshold
        wanted = max(t, self.decryptors)
        ins = FitIns(
            ndarrays_to_parameters(signed),
            {SECAGG_MODE: MODE_DECRYPT, SECAGG_ROUND: server_round, SECAGG_KEY_ID: self.public_key.key_id},
        )
        order = list(candidates)
        self._rng.shuffle(order)
        waiting = iter(order)
        partials: dict[int, list[int]] = {}
        count = len(aggregate.ciphertexts)

        def ask(proxy: ClientProxy) -> tuple[int, list[int]]:
            res = proxy.fit(ins, timeout=self.timeout, group_id=server_round)
            arrays = parameters_to_ndarrays(res.parameters)
            if len(arrays) != 1 or SECAGG_SHARE_INDEX not in res.metrics:
                raise CiphertextRejected("malformed", "a partial decryption is one array plus its share index")
            return int(res.metrics[SECAGG_SHARE_INDEX]), decode_partials(arrays[0], self.public_key, count)

        with ThreadPoolExecutor(max_workers=wanted, thread_name_prefix="decryptor") as pool:
            pending = {pool.submit(ask, proxy): proxy for proxy in islice(waiting, wanted)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    proxy = pending.pop(future)
                    try:
                        index, values = future.result()
                        if index in partials:
                            raise CiphertextRejected("malformed", f"share {index} answered twice")
                        partials[index] = values
                    except Exception as err:  # noqa: BLE001 - a failed decryptor is replaced, not fatal
                        log(WARNING, "Round %s: decryptor %s failed (%s); trying another", server_round, proxy.cid, err)
                        replacement = next(waiting, None)
                        if replacement is not None:
                            pending[pool.submit(ask, replacement)] = replacement
        if len(partials) < t:
            log(WARNING, "Round %s: %d of the %d partial decryptions needed; the round is skipped",
                server_round, len(partials), t)
            return None
        indices = sorted(partials)
        subsets = [indices[:t]] + ([indices[-t:]] if len(indices) > t else [])
        try:
            totals = [
                combine_threshold({i: partials[i] for i in subset}, aggregate, public_key=self.public_key,
                                  params=self.threshold, settings=self.settings)
                for subset in subsets
            ]
        except (CiphertextRejected, ValueError) as err:
            log(WARNING, "Round %s: partial decryptions do not combine (%s); the round is skipped", server_round, err)
            return None
        if any(not np.array_equal(totals[0], other) for other in totals[1:]):
            log(WARNING, "Round %s: key-share subsets %s disagree; the round is skipped", server_round, subsets)
            return None
        log(INFO, "Round %s: sum of %d signed encrypted updates decrypted with key shares %s", server_round,
            len(aggregate.contributors), indices)
        return totals[0], aggregate.weight
