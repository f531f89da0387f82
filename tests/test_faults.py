"""Faults against the real ServerApp and ClientApp: every kind has a run that shows what happens and why.

Runs go over :class:`tests.inprocess.ThreadGrid` (the project's ServerApp and
ClientApp, every mod included, nodes as threads; seconds per run instead of a
Ray start), so each fault kind gets its own run. One Ray simulation at the end
checks the same accounting in Flower's simulation engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Context, Error, RecordDict
from flwr.common.constant import ErrorCode

from fedapp.client_app import make_client_app
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.datasets import dataset_spec
from fedapp.faults import MALFORMATIONS, fault_for, malform, node_schedule
from fedapp.metrics import read_jsonl
from fedapp.models import build_model
from fedapp.rounds import Outcome, RunFailed, classify_error, one_line
from fedapp.rounds.progress import ProgressReader, progress_line
from fedapp.server_app import make_server_app, run_experiment
from fedapp.store.db import RunStore
from fedapp.training import get_weights, set_weights
from fedapp.validation import MalformedUpdateError, check_update
from tests.inprocess import ThreadGrid


DEADLINE = 4.0  # seconds: well above a tiny client's round (~0.3 s) on a loaded 2-core machine


def experiment(tmp_path: Path, **sections: dict[str, Any]) -> ExperimentConfig:
    raw: dict[str, Any] = {
        "name": "faults",
        "num_rounds": 2,
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 600, "synthetic_test_size": 200},
        "model": {"name": "cnn_mnist_small"},
        "partition": {"num_clients": 4},
        "strategy": {"round_timeout_s": 60.0},  # tests of deadlines set their own
        "runtime": {"output_dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return ExperimentConfig.from_dict(raw)


class Run:
    """One in-process run: its outcome, round rows and events."""

    def __init__(self, cfg: ExperimentConfig, grid_type: type[ThreadGrid] = ThreadGrid) -> None:
        self.cfg = cfg
        grid = grid_type(cfg, make_client_app(cfg))
        context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.error: BaseException | None = None
        self.summary: dict[str, Any] = {}
        try:
            self.summary = run_experiment(grid, context, cfg)
        except RunFailed as err:
            self.error = err
        finally:
            grid.close()
        out = Path(cfg.runtime.output_dir)
        self.rows = {r["round"]: r for r in json.loads((out / "metrics.json").read_text())}
        self.events = read_jsonl(out / "events.jsonl")
        self.progress = read_jsonl(out / "progress.jsonl")

    def failures(self, kind: str = "client_failure") -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


# ---- the plan ------------------------------------------------------------------------------------
def test_random_faults_hit_about_the_fraction_and_the_same_clients_on_every_node() -> None:
    cfg = ExperimentConfig.from_dict({"faults": {"kind": "crash", "fraction": 0.3, "seed": 5}, "num_rounds": 200})
    hits = [[fault_for(cfg.faults, pid, r) is not None for pid in range(10)] for r in range(1, 201)]
    rate = np.mean(hits)
    assert 0.25 < rate < 0.35
    assert len({tuple(h) for h in hits}) > 50  # different clients each round
    again = [[fault_for(cfg.faults, pid, r) is not None for pid in range(10)] for r in range(1, 201)]
    assert again == hits  # a fresh ClientApp process decides the same


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"kind": "melt"}, "faults.kind must be one of"),
        ({"kind": "crash"}, "hits no client"),
        ({"kind": "crash", "clients": "9"}, "outside"),
        ({"kind": "malformed", "clients": "1", "malformation": "weird"}, "faults.malformation"),
        ({"kind": "crash", "clients": "1", "rounds": "7"}, "faults.rounds"),
        ({"node_schedule": "kill 1 at 2"}, "faults.node_schedule item"),
        ({"kind": "exit", "clients": "1"}, "runtime.mode=processes"),
    ],
)
def test_impossible_faults_are_refused_with_the_key(faults: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"faults": faults, "partition": {"num_clients": 4}, "num_rounds": 3})


def test_node_schedule_is_parsed_in_round_order() -> None:
    cfg = ExperimentConfig.from_dict({"faults": {"node_schedule": "restart 1 @5, kill 1 @2"},
                                      "runtime": {"mode": "processes"}, "num_rounds": 6})  # fmt: skip
    assert [(a.action, a.partition_id, a.round) for a in node_schedule(cfg.faults)] == [("kill", 1, 2), ("restart", 1, 5)]


@pytest.mark.parametrize("kind", MALFORMATIONS)
def test_every_malformation_is_refused_by_the_server_checks(kind: str) -> None:
    reference = get_weights(build_model("cnn_mnist_small", dataset_spec("synthetic-mnist")))
    honest = [w + np.float32(0.01) for w in reference]
    check_update(honest, [r.shape for r in reference], 100, [r.dtype for r in reference])  # the honest one passes
    for seed in range(20):
        broken = malform(kind, reference, honest, np.random.default_rng(seed))
        try:
            check_update(broken, [r.shape for r in reference], 100, [r.dtype for r in reference])
        except MalformedUpdateError:
            continue
        norm = np.sqrt(sum(float(np.sum((b.astype(np.float64) - r) ** 2)) for b, r in zip(broken, reference)))
        assert kind == "norm" and norm > 1000.0, f"{kind} seed {seed} passed every check (norm {norm:.3g})"


# ---- reasons -------------------------------------------------------------------------------------
def test_a_model_mismatch_is_one_line_naming_the_tensor_and_both_shapes() -> None:
    spec = dataset_spec("synthetic-mnist")
    client_model = build_model("cnn_mnist", spec)
    server_weights = get_weights(build_model("cnn_mnist_small", spec))
    with pytest.raises(Exception) as caught:
        set_weights(client_model, server_weights)
    line = one_line(f"Traceback (most recent call last):\n  File ...\n\x1b[31m{caught.value}\x1b[0m")
    assert line == "model mismatch (features.0.weight [16,1,8,8] vs [32,1,3,3])"  # the server's shape, then the client's
    assert "\n" not in line and "\x1b" not in line and len(line) < 120


def test_flower_error_replies_are_classified() -> None:
    assert classify_error(Error(ErrorCode.NODE_UNAVAILABLE, "gone"))[0] is Outcome.NODE_LOST
    outcome, reason = classify_error(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "x\n" * 500 + "ValueError: bad input"))
    assert (outcome, reason) == (Outcome.FAILED, "ValueError: bad input")


# ---- each fault kind in a run ---------------------------------------------------------------------
def test_crash_is_counted_with_the_clients_reason_and_the_run_completes(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, faults={"kind": "crash", "clients": "1"}))
    assert run.error is None and run.summary["rounds"] == 2
    for r in (1, 2):
        assert (run.rows[r]["fit_trained"], run.rows[r]["fit_failed"], run.rows[r]["fit_sampled"]) == (3, 1, 4)
    [first, _] = run.failures()
    assert first["client"] == "1" and first["outcome"] == "failed"
    assert first["reason"] == "InjectedFault: injected crash on client 1 in round 1 (faults.kind=crash)"
    assert run.summary["failures"]["failed"] == 2


def test_a_hung_client_costs_one_deadline_and_its_late_reply_is_dropped(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, faults={"kind": "hang", "clients": "2", "hang_s": 3 * DEADLINE},
                         strategy={"round_timeout_s": DEADLINE}))  # fmt: skip
    assert run.error is None
    for r in (1, 2):
        assert (run.rows[r]["fit_trained"], run.rows[r]["fit_timed_out"]) == (3, 1)
        assert run.rows[r]["fit_time_s"] < DEADLINE + 1.0  # one deadline, not the hang
    assert all(f"round_timeout_s={DEADLINE:g}" in f["reason"] for f in run.failures())


def test_a_straggler_slower_than_the_deadline_is_dropped_but_not_a_fast_one(tmp_path: Path) -> None:
    slow = Run(experiment(tmp_path / "slow", faults={"kind": "straggler", "clients": "0", "slowdown": 200.0},
                          strategy={"round_timeout_s": DEADLINE}))  # fmt: skip
    assert slow.rows[1]["fit_timed_out"] == 1
    fast = Run(experiment(tmp_path / "fast", faults={"kind": "straggler", "clients": "0", "slowdown": 1.5},
                          strategy={"round_timeout_s": 20.0}))  # fmt: skip
    assert fast.rows[1]["fit_timed_out"] == 0 and fast.rows[1]["fit_trained"] == 4


def test_a_dropped_connection_is_a_missing_reply(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, faults={"kind": "drop", "clients": "3", "hang_s": 3 * DEADLINE},
                         strategy={"round_timeout_s": DEADLINE}))  # fmt: skip
    assert run.rows[1]["fit_timed_out"] == 1 and run.rows[1]["fit_trained"] == 3


def test_a_process_exit_is_a_missing_reply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def exit_(code: int) -> None:  # the thread stands in for the ClientApp process
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_)
    cfg = experiment(tmp_path, faults={"kind": "exit", "clients": "0"}, strategy={"round_timeout_s": DEADLINE},
                     runtime={"mode": "processes"})  # fmt: skip
    run = Run(cfg)
    assert run.error is None and run.rows[1]["fit_timed_out"] == 1


@pytest.mark.parametrize("malformation", ["nan", "shape", "count", "dtype", "norm"])
def test_a_malformed_update_is_refused_and_the_honest_ones_aggregated(tmp_path: Path, malformation: str) -> None:
    run = Run(experiment(tmp_path, faults={"kind": "malformed", "clients": "1", "malformation": malformation}))
    assert run.error is None
    for r in (1, 2):
        assert (run.rows[r]["fit_trained"], run.rows[r]["fit_refused"]) == (3, 1)
    refusals = run.failures("update_rejected")
    assert {e["client"] for e in refusals} == {"1"} and len(refusals) == 2
    assert run.summary["final_test_accuracy"] is not None and np.isfinite(run.summary["final_test_loss"])


def test_a_replayed_update_is_refused(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, num_rounds=3, faults={"kind": "replay", "clients": "2", "rounds": "3"}))
    assert run.rows[3]["fit_refused"] == 1
    [refusal] = run.failures("update_rejected")
    assert refusal["client"] == "2" and refusal["reason"] == "replayed update: byte-identical to its round 2 update"


def test_an_absurd_update_without_validation_breaks_the_model_and_the_run_fails(tmp_path: Path) -> None:
    # cnn_mnist (ReLU): weights near 1e36 make the outputs overflow (tanh in cnn_mnist_small would saturate)
    reference = get_weights(build_model("cnn_mnist", dataset_spec("synthetic-mnist")))
    seed = next(  # a seed whose round-1 update for client 1 has entries near float32's limit
        s for s in range(2000)
        if max(np.abs(a).max() for a in malform("norm", reference, [r + np.float32(0.01) for r in reference],
                                                np.random.default_rng([s, 1, 1, 0xBAD]))) > 3e36
    )  # fmt: skip
    cfg = experiment(tmp_path, model={"name": "cnn_mnist"},
                     faults={"kind": "malformed", "clients": "1", "malformation": "norm", "seed": seed},
                     validation={"max_update_norm": 0.0, "relative_norm_bound": 0.0})  # fmt: skip
    run = Run(cfg)
    assert isinstance(run.error, RunFailed) and "not finite" in str(run.error)
    assert str(run.error).startswith("round 1: ")  # at once, not after the last round
    store = RunStore(os.environ["FEDAPP_STORE_URL"])
    [record] = [r for r in store.list_runs() if r.output_dir == cfg.runtime.output_dir]
    assert record.status == "failed" and "not finite" in (record.error or "")


def test_a_round_where_every_client_fails_fails_the_run_in_one_line(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, faults={"kind": "crash", "clients": "0,1,2,3"}))
    assert isinstance(run.error, RunFailed)
    assert str(run.error) == (
        "round 1: 0 of 4 clients trained: 4 failed: InjectedFault: injected crash on client 0 in round 1 (faults.kind=crash)"
    )
    assert 2 not in run.rows  # it stopped at once
    assert run.progress[-1]["kind"] == "end" and run.progress[-1]["status"] == "failed"


def test_failed_rounds_within_the_tolerance_let_the_run_go_on(tmp_path: Path) -> None:
    cfg = experiment(tmp_path, num_rounds=3, faults={"kind": "crash", "clients": "0,1,2,3", "rounds": "2"},
                     strategy={"max_failed_rounds": 1})  # fmt: skip
    run = Run(cfg)
    assert run.error is None
    assert run.rows[2]["round_failed"] is True and run.rows[3]["fit_trained"] == 4
    assert run.summary["failed_rounds"] == 1


class LosingGrid(ThreadGrid):
    """Loses partition 1's node when round 2's messages go out (as a killed SuperNode)."""

    def push_messages(self, messages):  # noqa: ANN001, ANN201 - Grid's signature
        messages = list(messages)
        if any(m.metadata.group_id == "2" for m in messages):
            self.lose(1)
        return super().push_messages(messages)


def test_a_lost_node_costs_one_deadline_and_the_run_goes_on_with_the_others(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, num_rounds=3, strategy={"round_timeout_s": DEADLINE}), LosingGrid)
    assert run.error is None
    assert run.rows[2]["fit_node_lost"] == 1 and run.rows[2]["fit_trained"] == 3
    assert run.rows[3]["fit_sampled"] == 3 and run.rows[3]["fit_failures"] == 0  # no longer sampled
    assert run.failures()[0]["client"] == "1"


class ShrinkingGrid(ThreadGrid):
    """Loses three of four nodes after round 1."""

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        if any(m.metadata.group_id == "2" for m in messages):
            for pid in (1, 2, 3):
                self.lose(pid)
        return super().push_messages(messages)


def test_too_few_nodes_makes_the_server_wait_a_bounded_time_then_fail(tmp_path: Path) -> None:
    cfg = experiment(tmp_path, num_rounds=3, strategy={"round_timeout_s": 1.0, "node_wait_s": 2.0, "max_failed_rounds": 3})
    run = Run(cfg, ShrinkingGrid)
    assert isinstance(run.error, RunFailed)
    assert str(run.error).startswith("round 3: only 1 of the 2 nodes needed (strategy.min_available_clients)")
    assert [p["kind"] for p in run.progress].count("waiting") >= 1


# ---- entry points and progress ---------------------------------------------------------------------
def test_a_bad_run_config_fails_the_serverapp_before_any_round_in_one_line() -> None:
    app = make_server_app()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"num_rounds": 0})
    with pytest.raises(RunFailed, match=r"^run config refused: num_rounds must be") as caught:
        app._main(None, context)  # type: ignore[misc]
    assert "\n" not in str(caught.value)


def test_progress_file_carries_the_replies_and_round_lines_the_launcher_prints(tmp_path: Path) -> None:
    run = Run(experiment(tmp_path, faults={"kind": "crash", "clients": "1"}))
    reader = ProgressReader(Path(run.cfg.runtime.output_dir) / "progress.jsonl")
    lines = [progress_line(r) for r in reader.new_records()]
    assert reader.new_records() == []  # incremental: nothing twice
    printed = [line for line in lines if line]
    assert any(line.startswith("Round 1/2: 3 of 4 clients trained: 1 failed: InjectedFault") for line in printed)
    assert "Round 1: client 1 failed" in printed
    replies = [r for r in run.progress if r["kind"] == "reply" and r["round"] == 1]
    assert [r["replies"] for r in replies] == [1, 2, 3, 4]


# ---- the launcher's side: following progress and killing / restarting SuperNodes -------------------------
def test_the_launcher_kills_and_restarts_nodes_as_rounds_start_and_echoes_the_lines(tmp_path: Path) -> None:
    import sys

    from fedapp.deploy.processes import Launch, check_alive, start, stop_all
    from fedapp.deploy.watch import NodeSpec, RunWatcher

    cfg = ExperimentConfig.from_dict({"num_rounds": 6, "runtime": {"mode": "processes"}, "partition": {"num_clients": 2},
                                      "faults": {"node_schedule": "kill 1 @2, restart 1 @5"}})  # fmt: skip
    launch = Launch(marker="test")
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = {i: NodeSpec(i, f"supernode-{i}", command) for i in range(2)}
    for spec in nodes.values():
        start(launch, spec.name, logs, dict(os.environ), spec.command)
    progress = tmp_path / "progress.jsonl"
    printed: list[str] = []
    watcher = RunWatcher(launch, dict(os.environ), logs, progress, schedule=node_schedule(cfg.faults), nodes=nodes,
                         emit=printed.append)  # fmt: skip
    try:
        def write(record: dict[str, Any]) -> None:
            with progress.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            watcher.tick()

        write({"kind": "start", "round": 1, "expected": 2})
        assert all(p.popen.poll() is None for p in launch.procs)
        write({"kind": "start", "round": 2, "expected": 2})
        [node1] = [p for p in launch.procs if p.name == "supernode-1"]
        assert node1.popen.poll() is not None and node1.expected_exit  # killed, on purpose
        check_alive(launch, nodes_may_die=True)  # a dead SuperNode does not abort the launch
        write({"kind": "round", "round": 2, "line": "Round 2/6: 1 of 2 clients trained: 1 node lost: node disconnected"})
        write({"kind": "start", "round": 5, "expected": 1})
        restarted = [p for p in launch.procs if p.name == "supernode-1" and p.popen.poll() is None]
        assert len(restarted) == 1 and restarted[0] is not node1
        assert [a["action"] for a in watcher.done_actions] == ["kill", "restart"]
        assert "Round 2/6: 1 of 2 clients trained: 1 node lost: node disconnected" in printed
        assert any("killed SuperNode supernode-1" in line for line in printed)
    finally:
        stop_all(launch)
    assert all(p.popen.poll() is not None for p in launch.procs)


@pytest.mark.slow
def test_crashes_are_accounted_the_same_in_flowers_simulation_engine(tmp_path: Path) -> None:
    from fedapp.config import FaultsConfig
    from fedapp.simulation import run_in_simulation

    cfg = experiment(tmp_path, num_rounds=3, partition={"num_clients": 3}, strategy={"round_timeout_s": 300.0, "min_fit_clients": 1},
                     faults={"kind": "crash", "fraction": 0.4, "seed": 3})  # fmt: skip
    plan = FaultsConfig(kind="crash", fraction=0.4, seed=3)
    expected = {(r, str(c)) for r in (1, 2, 3) for c in range(3) if fault_for(plan, c, r)}
    summary = run_in_simulation(cfg)
    events = read_jsonl(Path(cfg.runtime.output_dir) / "events.jsonl")
    counted = {(e["round"], e["client"]) for e in events if e["kind"] == "client_failure"}
    assert counted == expected and expected  # every injected crash, named by its partition id, nothing else
    assert summary["failures"]["failed"] == len(expected)
    assert all(e["reason"].startswith("InjectedFault: injected crash") for e in events if e["kind"] == "client_failure")


@pytest.mark.parametrize(
    ("log", "cause"),
    [
        ("wrongca", "not the CA that signed"),
        ("sanmismatch", "not issued for the address"),
        ("unregistered", "public key is not registered"),
        ("noauthkey", "requires node authentication"),
        ("insecure", "drop --insecure"),
    ],
)
def test_a_node_that_cannot_join_is_explained_from_its_log(log: str, cause: str) -> None:
    """Logs recorded from real flower-supernode processes refused by a TLS / node-auth SuperLink (Flower 1.41)."""
    from fedapp.deploy.diagnose import diagnose_file

    explained = diagnose_file(Path(__file__).parent / "fixtures" / "node_logs" / f"{log}.txt")
    assert explained is not None and cause in explained


def test_the_terminal_bar_advances_with_every_reply_and_restores_the_log_handler(tmp_path: Path) -> None:
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    from fedapp.rounds.progress import RoundProgress

    handlers = [h for h in FLOWER_LOGGER.handlers if type(h) is logging.StreamHandler]
    before = [h.stream for h in handlers]
    progress = RoundProgress(tmp_path, num_rounds=3, live=True)
    progress.start_round(1, expected=3)
    for i, outcome in enumerate(["replied", "failed", "replied"], start=1):
        progress.reply(1, str(i), outcome)
        assert progress._bar.tasks[0].completed == i
    progress.end_round(1, "Round 1/3: 2 of 3 clients trained: 1 failed: x", {"test_accuracy": 0.5, "fit_failures": 1})
    assert "acc 50.0%" in progress._bar.tasks[0].description
    progress.end_run("completed")
    assert [h.stream for h in handlers] == before
    kinds = [r["kind"] for r in read_jsonl(tmp_path / "progress.jsonl")]
    assert kinds == ["start", "reply", "reply", "reply", "round", "end"]


# ---- what a hostile client tries (review findings) ----------------------------------------------------------
class RewritingGrid(ThreadGrid):
    """Rewrites partition 2's replies on the wire: ``mode`` is ``garbage`` (undecodable arrays) or ``spoof``
    (it claims to be partition 1)."""

    mode = "garbage"

    def _handle(self, msg):  # noqa: ANN001, ANN202 - ThreadGrid's
        from flwr.app import Array, ArrayRecord

        reply = super()._handle(msg)
        if reply is None or not reply.has_content() or msg.metadata.dst_node_id != self.node_ids[2]:
            return reply
        if self.mode == "garbage":
            reply.content.array_records["fitres.parameters"] = ArrayRecord(
                {"0": Array(dtype="float32", shape=(10**9,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")}
            )
        else:
            reply.content.config_records["fitres.metrics"]["partition_id"] = 1
        return reply


def test_an_undecodable_reply_is_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    RewritingGrid.mode = "garbage"
    run = Run(experiment(tmp_path), RewritingGrid)
    assert run.error is None
    assert (run.rows[1]["fit_trained"], run.rows[1]["fit_refused"]) == (3, 1)
    [refusal] = [e for e in run.failures("update_rejected") if e["round"] == 1]
    assert refusal["reason"].startswith("undecodable update") and refusal["client"] == "2"


def test_a_client_claiming_another_partition_cannot_move_its_refusal_onto_it(tmp_path: Path) -> None:
    RewritingGrid.mode = "spoof"
    cfg = experiment(tmp_path, faults={"kind": "malformed", "clients": "2", "malformation": "nan"})
    run = Run(cfg, RewritingGrid)
    for r in (1, 2):
        assert (run.rows[r]["fit_trained"], run.rows[r]["fit_refused"], run.rows[r]["fit_sampled"]) == (3, 1, 4)
    refusals = run.failures("update_rejected")
    assert {str(e["node_id"]) for e in refusals} == {"1002"}  # partition 2's node, whatever it claims


def test_an_inflated_sample_count_is_refused() -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    from fedapp.metrics import RunRecorder
    from fedapp.validation import UpdateValidation

    model = [np.zeros((2, 2), np.float32)]
    strategy = UpdateValidation(FedAvg(), RunRecorder(Path(os.environ.get("TMPDIR", "/tmp")) / "inflated"))
    strategy._global = model
    proxies = [_Proxy(str(i)) for i in range(4)]
    honest = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([model[0] + 0.1]), 100, {})) for p in proxies[:3]]
    greedy = (proxies[3], FitRes(Status(Code.OK, ""), ndarrays_to_parameters([model[0] + 0.5]), 2**62, {}))
    params, _ = strategy.aggregate_fit(1, [*honest, greedy], [])
    from flwr.common import parameters_to_ndarrays

    assert np.allclose(parameters_to_ndarrays(params)[0], 0.1)  # the mean of the honest three


def test_colluders_sending_tiny_updates_cannot_get_honest_ones_refused() -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedapp.metrics import RunRecorder
    from fedapp.validation import UpdateValidation

    model = [np.zeros(100, np.float32)]
    strategy = UpdateValidation(_NoAggregation(), RunRecorder(Path(os.environ.get("TMPDIR", "/tmp")) / "tiny"))
    strategy._global = model
    proxies = [_Proxy(str(i)) for i in range(5)]

    def reply(p: Any, scale: float) -> tuple[Any, FitRes]:
        return p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(100, scale, np.float32)]), 10, {})

    strategy.aggregate_fit(1, [reply(p, 0.1 + 0.01 * i) for i, p in enumerate(proxies)], [])  # an honest round
    kept = strategy.aggregate_fit(2, [reply(proxies[0], 0.105), reply(proxies[1], 0.12),
                                      *(reply(p, 1e-7) for p in proxies[2:])], [])  # fmt: skip
    assert {p.cid for p, _ in kept} >= {"0", "1"}  # the reference is floored at a tenth of round 1's


def test_injected_faults_need_the_nodes_consent() -> None:
    from fedapp.node_policy import FAULT_INJECTION, pin_to_node

    cfg = ExperimentConfig.from_dict({"faults": {"kind": "hang", "clients": "0"}, "partition": {"num_clients": 2}})
    with pytest.raises(ConfigError, match=f"{FAULT_INJECTION}=allow"):
        pin_to_node(cfg, {"partition-id": 0})
    assert pin_to_node(cfg, {"partition-id": 0, FAULT_INJECTION: "allow"}).faults.kind == "hang"


def test_client_text_cannot_drive_the_operators_terminal() -> None:
    line = one_line("ValueError: boom\x1b]0;owned\x07\x1b[2J\x08'>")
    assert line == "ValueError: boom]0;owned" and not any(ord(c) < 32 for c in line)


def test_under_client_dp_an_error_leaves_the_node_as_its_type_only(tmp_path: Path) -> None:
    from flwr.common import FitIns, Message, MessageType, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    cfg = experiment(tmp_path, privacy={"client": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 0.0,
                                                   "sample_rate": 0.1}})  # fmt: skip
    grid = ThreadGrid(cfg, make_client_app(cfg))
    count = len(get_weights(build_model("cnn_mnist_small", dataset_spec("synthetic-mnist"))))
    wrong = [np.full((3, 3), 7.25, np.float32)] * count  # torch refuses the shapes, quoting them
    msg = Message(content=compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(wrong), {"server_round": 1}), True),
                  dst_node_id=grid.node_ids[0], message_type=MessageType.TRAIN, group_id="1")  # fmt: skip
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = grid._handle(msg)
    grid.close()
    assert reply is not None and reply.has_error()
    assert "details withheld under client DP" in reply.error.reason and "[client 0]" in reply.error.reason
    assert "size mismatch" not in reply.error.reason and "[3, 3]" not in reply.error.reason


class _Proxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.node_id = int(cid)


class _NoAggregation:
    """A base strategy that hands back what reached it (to see what validation kept)."""

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return results
