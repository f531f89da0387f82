"""/metrics: what the store holds comes out of the exposition, parsed back by Prometheus' own parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedapp.api.prometheus import GAUGES, render_metrics
from fedapp.store import ClientUpdateRecord, RoundRecord, RunRecord, RunStore, config_hash
from fedapp.store.records import ActionRecord

FAST = {"retries": 1, "retry_wait_s": 0.01, "timeout_s": 1.0}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}", **FAST) as opened:
        yield opened


def new_run(store: RunStore, run_id: str, *, name: str = "tiny", started_at: float = 1000.0,
            num_rounds: int = 3, strategy: str = "krum") -> None:
    config = {"num_rounds": num_rounds, "strategy": {"name": strategy}}
    store.create_run(RunRecord(
        run_id=run_id, name=name, config=config, config_hash=config_hash(config), code_version="v-test",
        status="running", started_at=started_at, output_dir=f"/out/{run_id}",
    ))


def commit(store: RunStore, run_id: str, rnd: int, metrics: dict, updates: list[tuple[str, str, float | None]] = (),
           *, attempt: int = 1, seconds: float = 2.5) -> None:
    start = 1000.0 + 10 * rnd + attempt
    record = RoundRecord(run_id, rnd, attempt, {"round": rnd, **metrics}, start, start + seconds, [])
    rows = [ClientUpdateRecord(run_id, rnd, attempt, client, status, epsilon=eps) for client, status, eps in updates]
    store.commit_round(run_id, record, rows, [], None, audit_head=f"h{rnd}", audit_seq=rnd)


def scrape(store: RunStore, **kwargs: int) -> dict[str, dict[tuple, float]]:
    """Family name -> {(sample name, labels...): value}, through prometheus_client's text parser."""
    body, content_type = render_metrics(store, **kwargs)
    assert content_type.startswith("text/plain; version=0.0.4")
    parsed: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        samples = parsed.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return parsed


def value(parsed: dict[str, dict[tuple, float]], family: str, run_id: str, name: str = "tiny") -> float | None:
    sample = family + "_total" if family == "fedapp_rounds" else family
    return parsed.get(family, {}).get((sample, ("name", name), ("run_id", run_id)))


def test_a_running_run_exports_what_its_last_round_stored(store: RunStore) -> None:
    new_run(store, "run-1")
    commit(store, "run-1", 0, {"test_accuracy": 0.1, "test_loss": 2.3})
    commit(store, "run-1", 1, {"test_accuracy": 0.6, "test_loss": 1.1, "fit_sampled": 3, "fit_trained": 3,
                               "fit_failures": 0, "epsilon_max": 0.9},
           [("c0", "accepted", 0.9), ("c1", "accepted", 0.8), ("c2", "accepted", 0.7)])
    commit(store, "run-1", 2, {"test_accuracy": 0.75, "test_loss": 0.5, "fit_sampled": 4, "fit_trained": 3,
                               "fit_failures": 1, "quarantined": 2, "central_epsilon": 1.25},
           [("c0", "accepted", 1.5), ("c1", "refused", 1.75), ("c2", "refused", None), ("c3", "quarantined", 0.2)],
           seconds=4.5)

    m = scrape(store)

    assert m["fedapp_run_info"][("fedapp_run_info", ("name", "tiny"), ("run_id", "run-1"), ("status", "running"),
                                 ("strategy", "krum"))] == 1.0
    assert value(m, "fedapp_run_running", "run-1") == 1.0
    assert value(m, "fedapp_round", "run-1") == 2.0
    assert value(m, "fedapp_rounds_planned", "run-1") == 3.0
    assert value(m, "fedapp_test_accuracy", "run-1") == 0.75
    assert value(m, "fedapp_test_loss", "run-1") == 0.5
    assert value(m, "fedapp_clients_sampled", "run-1") == 4.0
    assert value(m, "fedapp_clients_trained", "run-1") == 3.0
    assert value(m, "fedapp_clients_refused", "run-1") == 2.0
    assert value(m, "fedapp_clients_quarantined", "run-1") == 2.0  # the detector's count, not the one update
    assert value(m, "fedapp_client_failures", "run-1") == 1.0
    assert value(m, "fedapp_epsilon_max", "run-1") == 1.75  # a refused client spent its budget too
    assert value(m, "fedapp_central_epsilon", "run-1") == 1.25
    assert value(m, "fedapp_round_seconds", "run-1") == 4.5
    assert value(m, "fedapp_rounds", "run-1") == 2.0  # round 0 trains nothing
    assert m["fedapp_rounds"] and all(k[0] == "fedapp_rounds_total" for k in m["fedapp_rounds"])


def test_unmeasured_and_non_finite_values_leave_no_sample(store: RunStore) -> None:
    new_run(store, "run-1", num_rounds=4)
    commit(store, "run-1", 0, {"test_accuracy": 0.1, "test_loss": 2.3})
    commit(store, "run-1", 1, {"test_accuracy": 0.5, "test_loss": 1.0, "fit_sampled": 2})
    # eval_every=2: round 2 is not evaluated; a broken loss is stored as the string "NaN"
    commit(store, "run-1", 2, {"test_loss": "NaN", "fit_sampled": "many", "fit_trained": True},
           [("c0", "quarantined", None)])
    store.finish_run("run-1", "completed")

    m = scrape(store)

    assert value(m, "fedapp_run_running", "run-1") == 0.0
    assert value(m, "fedapp_test_accuracy", "run-1") == 0.5  # the newest measured value
    assert value(m, "fedapp_test_loss", "run-1") == 1.0
    for family in ("fedapp_clients_sampled", "fedapp_clients_trained", "fedapp_epsilon_max", "fedapp_central_epsilon"):
        assert value(m, family, "run-1") is None, family
    assert value(m, "fedapp_clients_quarantined", "run-1") == 1.0  # no detector count: the round's updates


def test_a_resumed_run_counts_the_attempt_its_model_descends_from(store: RunStore) -> None:
    new_run(store, "run-1")
    commit(store, "run-1", 1, {"test_accuracy": 0.4, "fit_sampled": 2}, [("c0", "refused", 3.0)])
    commit(store, "run-1", 2, {"test_accuracy": 0.9, "fit_sampled": 2}, [("c0", "refused", 3.5)])
    store.start_attempt("run-1")
    commit(store, "run-1", 2, {"test_accuracy": 0.45, "fit_sampled": 3}, [("c0", "accepted", 3.5)], attempt=2)

    m = scrape(store)

    assert value(m, "fedapp_test_accuracy", "run-1") == 0.45  # attempt 1's round 2 was abandoned
    assert value(m, "fedapp_clients_sampled", "run-1") == 3.0
    assert value(m, "fedapp_clients_refused", "run-1") == 0.0
    assert value(m, "fedapp_epsilon_max", "run-1") == 3.5  # spent in any attempt
    assert value(m, "fedapp_rounds", "run-1") == 3.0  # committed rounds never go back: a counter


def test_the_rule_in_force_is_the_last_applied_switch(store: RunStore) -> None:
    new_run(store, "run-1", strategy="fedavg")
    for rule, status in (("median", "applied"), ("krum", "refused")):
        action = store.add_action(ActionRecord("run-1", "set_rule", {"rule": rule}, "op", 1000.0))
        store.settle_action(action.id, status, boundary_round=1, effective_round=2, result="")

    m = scrape(store)

    (labels,) = m["fedapp_run_info"]
    assert ("strategy", "median") in labels


def test_label_values_with_quotes_newlines_and_backslashes_survive(store: RunStore) -> None:
    name = 'evil"} fedapp_round{run_id="x"} 99\nline two \\ back\\slash \\n "q" ünï'
    new_run(store, "run-1", name=name)
    commit(store, "run-1", 1, {"test_accuracy": 0.5})

    body, _ = render_metrics(store)
    m = scrape(store)

    assert value(m, "fedapp_test_accuracy", "run-1", name=name) == 0.5
    assert set(m["fedapp_round"]) == {("fedapp_round", ("name", name), ("run_id", "run-1"))}
    assert b"\nline two" not in body  # the newline is escaped, not a new line of the exposition


def test_only_the_newest_runs_are_exported(store: RunStore) -> None:
    for i in range(4):
        new_run(store, f"run-{i}", started_at=1000.0 + i)

    m = scrape(store, max_runs=2)

    assert {dict(k[1:])["run_id"] for k in m["fedapp_run_info"]} == {"run-3", "run-2"}
    assert value(m, "fedapp_test_accuracy", "run-3") is None  # no round yet: no sample, no error
    assert value(m, "fedapp_round", "run-3") == 0.0


def test_an_empty_store_renders_valid_output_with_every_family(store: RunStore) -> None:
    m = scrape(store)

    assert set(m) == {"fedapp_run_info", "fedapp_rounds", *GAUGES}
    assert all(samples == {} for samples in m.values())


def test_a_negative_max_runs_is_refused(store: RunStore) -> None:
    with pytest.raises(ValueError, match="max_runs"):
        render_metrics(store, max_runs=-1)
