"""Declined replies become exclusions; too few clients left ends training cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg

from fedapp.exclusion import ClientExclusion, Exclusion, ExclusionList, ExcludingClientManager
from fedapp.metrics import RunRecorder, read_jsonl
from fedapp.validation import UpdateValidation

OK = Status(code=Code.OK, message="")
START = [np.zeros(2, dtype=np.float32)]


class FakeProxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


def manager_with(*cids: str) -> SimpleClientManager:
    manager = SimpleClientManager()
    for cid in cids:
        manager.register(FakeProxy(cid))  # type: ignore[arg-type]
    return manager


def update(value: float, pid: int) -> FitRes:
    return FitRes(OK, ndarrays_to_parameters([np.full(2, value, np.float32)]), 10, {"partition_id": pid})


def declined(pid: int) -> FitRes:
    metrics = {"partition_id": pid, "declined": 1, "reason_code": "privacy_budget", "reason": "epsilon 3.1 > 3"}
    return FitRes(OK, ndarrays_to_parameters(START), 0, metrics)


def stack(recorder: RunRecorder, min_fit: int) -> ClientExclusion:
    base = FedAvg(min_fit_clients=min_fit, min_available_clients=min_fit, initial_parameters=ndarrays_to_parameters(START))
    return ClientExclusion(UpdateValidation(base, recorder), min_fit_clients=min_fit, recorder=recorder)


def test_excluded_nodes_are_neither_counted_nor_sampled() -> None:
    # Prepare
    excluded = ExclusionList()
    excluded.add(Exclusion("b", "1", 1, "privacy_budget", "over budget"))
    view = ExcludingClientManager(manager_with("a", "b", "c"), excluded)

    # Execute
    sampled = {p.cid for p in view.sample(2)}

    # Assert
    assert view.num_available() == 2
    assert sampled == {"a", "c"}
    assert "b" in excluded and len(excluded) == 1


def test_declining_client_is_excluded_and_never_reaches_validation_or_aggregation(tmp_path: Path) -> None:
    # Prepare: three nodes, client on node "b" declines in round 1
    recorder = RunRecorder(tmp_path)
    strategy = stack(recorder, min_fit=2)
    manager = manager_with("a", "b", "c")
    params = ndarrays_to_parameters(START)
    strategy.configure_fit(1, params, manager)
    results = [(FakeProxy("a"), update(1.0, 0)), (FakeProxy("b"), declined(1)), (FakeProxy("c"), update(3.0, 2))]

    # Execute
    aggregated, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    round2 = strategy.configure_fit(2, params, manager)

    # Assert: mean of the two real updates (the declined zeros would have pulled it to 4/3)
    np.testing.assert_allclose(parameters_to_ndarrays(aggregated)[0], [2.0, 2.0])
    assert {proxy.cid for proxy, _ in round2} == {"a", "c"}
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [(e["kind"], e["client"], e["reason_code"]) for e in events] == [("client_excluded", "1", "privacy_budget")]
    assert events[0]["reason"] == "epsilon 3.1 > 3"
    assert recorder.rows[1]["fit_declined"] == 1


def test_training_ends_with_an_event_when_fewer_than_min_fit_clients_remain(tmp_path: Path) -> None:
    # Prepare: two nodes, min_fit_clients = 2, one declines
    recorder = RunRecorder(tmp_path)
    strategy = stack(recorder, min_fit=2)
    manager = manager_with("a", "b")
    params = ndarrays_to_parameters(START)
    strategy.configure_fit(1, params, manager)
    strategy.aggregate_fit(1, [(FakeProxy("a"), update(1.0, 0)), (FakeProxy("b"), declined(1))], [])  # type: ignore[arg-type]

    # Execute
    round2 = strategy.configure_fit(2, params, manager)
    round3 = strategy.configure_fit(3, params, manager)

    # Assert: no instructions, one event (not one per round)
    assert round2 == [] and round3 == []
    kinds = [e["kind"] for e in read_jsonl(tmp_path / "events.jsonl")]
    assert kinds == ["client_excluded", "training_ended"]
    assert strategy.ended_in_round == 2


def test_all_declined_keeps_the_model(tmp_path: Path) -> None:
    # Prepare
    strategy = stack(RunRecorder(tmp_path), min_fit=1)
    strategy.configure_fit(1, ndarrays_to_parameters(START), manager_with("a"))

    # Execute
    aggregated, metrics = strategy.aggregate_fit(1, [(FakeProxy("a"), declined(0))], [])  # type: ignore[arg-type]

    # Assert
    assert aggregated is None and metrics == {}
