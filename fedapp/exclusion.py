"""Exclude clients from sampling, with a recorded reason, and end training cleanly.

Generic on purpose: a client that has spent its privacy budget declines (and is
excluded here); Byzantine quarantine will put nodes on the same
:class:`ExclusionList`. Exclusion works through Flower's own sampling hook, a
:class:`~flwr.server.criterion.Criterion`, so the base strategy's
``configure_fit`` (fractions, minimums) stays Flower's.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Collection
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.common import FitIns, Parameters, Scalar, log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from fedapp.metrics import RunRecorder
from fedapp.wrappers import (
    DECLINED_KEY,
    REASON_CODE_KEY,
    REASON_KEY,
    Failures,
    FitResults,
    StrategyWrapper,
    client_label,
)


@dataclass(frozen=True)
class Exclusion:
    """Why and since when a node is no longer sampled."""

    node_id: str
    client: str
    round: int
    reason_code: str
    reason: str


class ExclusionList:
    """Node ids (``ClientProxy.cid``) that must not be sampled again, with reasons."""

    def __init__(self) -> None:
        self._entries: dict[str, Exclusion] = {}

    def add(self, entry: Exclusion) -> bool:
        """Exclude ``entry.node_id``; False if it already was (the first reason stays)."""
        if entry.node_id in self._entries:
            return False
        self._entries[entry.node_id] = entry
        return True

    def remove(self, node_id: str) -> Exclusion | None:
        """Let ``node_id`` be sampled again (a released quarantine); its entry, or None."""
        return self._entries.pop(node_id, None)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Exclusion]:
        """All exclusions in the order they were made."""
        return list(self._entries.values())

    def node_of(self, client: str) -> str | None:
        """The node id ``client`` is excluded under now (it changes when an entry is re-bound), or None."""
        return next((e.node_id for e in self._entries.values() if e.client == client), None)

    def stale_entry(self, client: str, node_id: str, live: Collection[str] = ()) -> Exclusion | None:
        """The exclusion of ``client`` made under another node id, if any (a resumed run).

        Node ids are assigned afresh when a SuperLink or simulation restarts, so
        after a resume an excluded client comes back under a new id; the client
        label (its partition id) is what identifies it across the restart. Only an
        entry whose node is gone (not in ``live``) moves: a live excluded node keeps its
        exclusion even if another node claims its label.
        """
        for entry in self._entries.values():
            if entry.client == client and entry.node_id != node_id and entry.node_id not in live:
                return entry
        return None

    def rebind(self, entry: Exclusion, node_id: str) -> Exclusion:
        """Move ``entry`` to ``node_id`` (same client, same reason); the new entry."""
        self._entries.pop(entry.node_id, None)
        moved = Exclusion(node_id, entry.client, entry.round, entry.reason_code, entry.reason)
        self._entries[node_id] = moved
        return moved

    def state_dict(self) -> dict[str, list[dict[str, object]]]:
        """Entries in order, for a checkpoint."""
        return {"entries": [dataclasses.asdict(e) for e in self._entries.values()]}

    def load_state_dict(self, state: dict[str, list[dict[str, object]]]) -> None:
        self._entries = {}
        for raw in state.get("entries", []):
            entry = Exclusion(**raw)  # type: ignore[arg-type]
            self._entries[entry.node_id] = entry


class NotExcluded(Criterion):
    """Selects clients not on ``excluded`` (and accepted by ``inner``, if given)."""

    def __init__(self, excluded: ExclusionList, inner: Criterion | None = None) -> None:
        self.excluded = excluded
        self.inner = inner

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded and (self.inner is None or self.inner.select(client))


class ClientManagerView(ClientManager):
    """Delegates everything to ``manager``; a view overrides what it changes (who counts, how many are sampled)."""

    def __init__(self, manager: ClientManager) -> None:
        self.manager = manager

    def num_available(self) -> int:
        return self.manager.num_available()

    def register(self, client: ClientProxy) -> bool:
        return self.manager.register(client)

    def unregister(self, client: ClientProxy) -> None:
        self.manager.unregister(client)

    def all(self) -> dict[str, ClientProxy]:
        return self.manager.all()

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return self.manager.wait_for(num_clients, timeout)

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None
    ) -> list[ClientProxy]:
        return self.manager.sample(num_clients, min_num_clients, criterion)


class ExcludingClientManager(ClientManagerView):
    """A view of ``manager`` in which excluded clients are neither counted nor sampled.

    ``num_available`` shrinks too, so FedAvg's ``fraction_fit`` and minimums apply to
    the clients that may still train.
    """

    def __init__(self, manager: ClientManager, excluded: ExclusionList) -> None:
        super().__init__(manager)
        self.excluded = excluded

    def num_available(self) -> int:
        return sum(1 for cid in self.manager.all() if cid not in self.excluded)

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return self.manager.wait_for(num_clients + len(self.excluded), timeout)

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None
    ) -> list[ClientProxy]:
        return self.manager.sample(num_clients, min_num_clients, NotExcluded(self.excluded, criterion))


class ClientExclusion(StrategyWrapper):
    """Turn declined fit replies into exclusions; stop training when too few clients remain.

    A reply with ``metrics[DECLINED_KEY] == 1`` is not an update: it is logged and
    recorded as an event with the client's reason, removed from the results (so
    validation and aggregation never see it), and its node is excluded from later
    sampling. When fewer than ``min_fit_clients`` clients may still train,
    ``configure_fit`` returns no instructions for the remaining rounds (Flower then
    skips their training) and says so once, in the log and as an event.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy.
    min_fit_clients : int
        Fewest clients a training round needs (the base strategy's minimum).
    recorder : RunRecorder | None
        Where events go (default: None, log only).
    excluded : ExclusionList | None
        A list shared with other wrappers (default: a new one).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        min_fit_clients: int,
        recorder: RunRecorder | None = None,
        excluded: ExclusionList | None = None,
    ) -> None:
        super().__init__(strategy)
        if min_fit_clients < 1:
            raise ValueError(f"min_fit_clients must be >= 1, got {min_fit_clients}")
        self.min_fit_clients = min_fit_clients
        self.recorder = recorder
        self.excluded = excluded if excluded is not None else ExclusionList()
        self.ended_in_round: int | None = None
        self._live: set[str] = set()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._live = set(client_manager.all())
        view = ExcludingClientManager(client_manager, self.excluded)
        remaining = view.num_available()
        if len(self.excluded) and remaining < self.min_fit_clients:
            if self.ended_in_round is None:
                self.ended_in_round = server_round
                reason = (
                    f"only {remaining} client(s) may still train but strategy.min_fit_clients="
                    f"{self.min_fit_clients}; {len(self.excluded)} excluded "
                    f"({', '.join(f'{e.client}: {e.reason_code}' for e in self.excluded.entries())}); "
                    "no further training rounds"
                )
                log(WARNING, "Round %s: training ended: %s", server_round, reason)
                if self.recorder:
                    self.recorder.event("training_ended", server_round, reason, remaining=remaining)
            return []
        return super().configure_fit(server_round, parameters, view)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        kept: FitResults = []
        for proxy, res in results:
            who = client_label(proxy, res)
            stale = self.excluded.stale_entry(who, proxy.cid, live=self._live)
            if stale is not None:
                self.excluded.rebind(stale, proxy.cid)
                reason = f"excluded in round {stale.round} ({stale.reason_code}) before the run was resumed; update dropped"
                log(INFO, "Round %s: client %s: %s", server_round, who, reason)
                if self.recorder:
                    self.recorder.event("client_excluded", server_round, reason, client=who, reason_code=stale.reason_code,
                                        node_id=proxy.cid)  # fmt: skip
                continue
            if res.metrics.get(DECLINED_KEY, 0) not in (1, True):  # any other value (even "yes") is not a decline
                kept.append((proxy, res))
                continue
            code = str(res.metrics.get(REASON_CODE_KEY, "unspecified"))
            reason = str(res.metrics.get(REASON_KEY, code))
            if self.excluded.add(Exclusion(proxy.cid, who, server_round, code, reason)):
                log(INFO, "Round %s: client %s declined (%s: %s); excluded from sampling", server_round, who, code, reason)
                if self.recorder:
                    self.recorder.event("client_excluded", server_round, reason, client=who, reason_code=code,
                                        node_id=proxy.cid)  # fmt: skip
        if self.recorder and len(kept) < len(results):
            self.recorder.record(server_round, fit_declined=len(results) - len(kept))
        if not kept:
            if results:  # replies that failed or never came are the failure accounting's (fedapp.rounds)
                log(WARNING, "Round %s: every client that replied declined; keeping the current model", server_round)
            return None, {}
        return super().aggregate_fit(server_round, kept, failures)

    def state_dict(self) -> dict[str, object]:
        """The exclusion list (shared with the quarantine) and whether training has ended."""
        return {"excluded": self.excluded.state_dict(), "ended_in_round": self.ended_in_round}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.excluded.load_state_dict(state["excluded"])  # type: ignore[arg-type]
        ended = state.get("ended_in_round")
        self.ended_in_round = None if ended is None else int(ended)  # type: ignore[arg-type]
