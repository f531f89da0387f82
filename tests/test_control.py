"""Operators' actions through the API, applied by a real ServerApp at the next round boundary.

Each test runs a short federation in this process (the project's ServerApp and
ClientApp over :class:`tests.inprocess.ThreadGrid`, no Ray) while ``fedapp serve``'s
application answers on a real uvicorn, and acts through HTTP as an operator would.
Client 3 is a straggler, so each round lasts long enough that "mid-round" is
unambiguous: a request is sent when the round's first reply has come in.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.common import Context, RecordDict

from fedapp.client_app import make_client_app
from fedapp.config import ExperimentConfig
from fedapp.metrics import read_jsonl
from fedapp.rounds.progress import ProgressReader
from fedapp.server_app import run_experiment
from fedapp.store.durable import AUDIT_FILE
from tests.api_live import LiveAPI
from tests.inprocess import ThreadGrid

pytestmark = pytest.mark.slow


def experiment(tmp_path: Path, num_rounds: int) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "name": "control",
        "num_rounds": num_rounds,
        "dataset": {"name": "synthetic_mnist", "synthetic_train_size": 600, "synthetic_test_size": 200},
        "model": {"name": "cnn_mnist_small"},
        "partition": {"num_clients": 4},
        "strategy": {"round_timeout_s": 120.0},
        "faults": {"kind": "straggler", "clients": "3", "slowdown": 6.0},  # rounds last ~1-2 s
        "runtime": {"output_dir": str(tmp_path / "run")},
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}", "run_id": "live"},
    })


class Federation:
    """The run in a background thread; ``wait_mid_round(k)`` returns once round k's first reply is in."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.error: BaseException | None = None
        self.progress = ProgressReader(Path(cfg.runtime.output_dir) / "progress.jsonl")
        self.seen: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="federation", daemon=True)

    def _run(self) -> None:
        grid = ThreadGrid(self.cfg, make_client_app(self.cfg))
        try:
            run_experiment(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}), self.cfg)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
        finally:
            grid.close()

    def start(self) -> "Federation":
        self._thread.start()
        return self

    def join(self, timeout: float = 300) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the run did not end"

    def wait_mid_round(self, server_round: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.seen += self.progress.new_records()
            if any(r.get("kind") == "reply" and r.get("round") == server_round for r in self.seen):
                if not any(r.get("kind") == "round" and r.get("round") == server_round for r in self.seen):
                    return
                raise AssertionError(f"round {server_round} ended before the test could act in it")
            assert self._thread.is_alive(), f"the run ended early: {self.error}"
            time.sleep(0.02)
        raise AssertionError(f"round {server_round} did not start")


def act(api: LiveAPI, token: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{api.url}/api/v1/runs/live/actions", json=body,
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()


def settled(api: LiveAPI, token: str, action: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.get(f"{api.url}/api/v1/runs/live/actions/{action['id']}?wait_s=60",
                       headers={"Authorization": f"Bearer {token}"}, timeout=70)
    assert answer.status_code == 200
    return answer.json()


def test_block_and_rule_switch_apply_at_the_next_boundary_and_stop_ends_the_run_resumably(tmp_path: Path) -> None:
    cfg = experiment(tmp_path, num_rounds=8)
    run = Federation(cfg).start()
    run.wait_mid_round(1)  # the store and its tables exist once round 1 runs
    with LiveAPI(cfg.store.url, tmp_path / "secret") as api:
        ops = api.token("operator", subject="alice")
        run.wait_mid_round(2)
        block = act(api, ops, {"action": "block", "client": "1", "reason": "suspicious updates"})
        switch = act(api, ops, {"action": "set_rule", "rule": "trimmedmean"})
        block, switch = settled(api, ops, block), settled(api, ops, switch)
        assert (block["status"], block["boundary_round"], block["effective_round"]) == ("applied", 2, 3)
        assert (switch["status"], switch["boundary_round"], switch["effective_round"]) == ("applied", 2, 3)
        assert "fedavg -> trimmedmean" in switch["result"]
        run.wait_mid_round(3)
        clients = {c["client"]: c for c in httpx.get(
            f"{api.url}/api/v1/runs/live/clients", headers=api.headers(), timeout=10).json()["clients"]}
        assert clients["1"]["status"] == "blocked" and "alice" in clients["1"]["status_reason"]
        summary = httpx.get(f"{api.url}/api/v1/runs/live", headers=api.headers(), timeout=10).json()
        assert summary["strategy"] == "trimmedmean"
        again = act(api, ops, {"action": "block", "client": "1"})  # twice: refused by the ServerApp, with why
        run.wait_mid_round(4)
        stop = act(api, ops, {"action": "stop", "reason": "end of the trial"})
        assert settled(api, ops, again)["result"] == "client 1 is already blocked"
        stop = settled(api, ops, stop)
        assert (stop["status"], stop["boundary_round"], stop["effective_round"]) == ("applied", 4, None)
        run.join()
        assert run.error is None
        rounds = {r.round: r for r in api.store.rounds("live")}
        record = api.store.get_run("live")
    assert "1" in rounds[2].participants and all("1" not in rounds[r].participants for r in (3, 4))
    assert max(rounds) == 4 and record.status == "interrupted" and "alice" in (record.error or "")
    assert api.store.latest_checkpoint("live").round == 4  # `fedapp resume live` continues from here
    entries = [e for e in read_jsonl(Path(cfg.runtime.output_dir) / AUDIT_FILE) if e["kind"] == "admin_action"]
    assert [(e["fields"]["action"], e["fields"]["status"], e["fields"]["requested_by"], e["round"]) for e in entries] == [
        ("block", "applied", "alice", 2), ("set_rule", "applied", "alice", 2), ("block", "refused", "alice", 3),
        ("stop", "applied", "alice", 4)]


def test_pause_holds_the_run_between_rounds_until_resume(tmp_path: Path) -> None:
    cfg = experiment(tmp_path, num_rounds=3)
    run = Federation(cfg).start()
    run.wait_mid_round(1)
    with LiveAPI(cfg.store.url, tmp_path / "secret") as api:
        ops = api.token("operator")
        pause = settled(api, ops, act(api, ops, {"action": "pause"}))
        assert (pause["status"], pause["boundary_round"]) == ("applied", 1)
        held = time.monotonic()
        time.sleep(3.0)
        assert api.store.get_run("live").last_round == 1  # nothing trains while paused
        summary = httpx.get(f"{api.url}/api/v1/runs/live", headers=api.headers(), timeout=10).json()
        assert summary["paused"] is True
        cpr = settled(api, ops, act(api, ops, {"action": "set_clients_per_round", "clients_per_round": 2}))
        assert (cpr["status"], cpr["boundary_round"], cpr["effective_round"]) == ("applied", 1, 2)  # applied while paused
        resume = settled(api, ops, act(api, ops, {"action": "resume"}))
        assert (resume["status"], resume["effective_round"]) == ("applied", 2)
        run.join()
        assert run.error is None
        rounds = {r.round: r for r in api.store.rounds("live")}
        assert rounds[2].started_at - held >= 3.0
        assert rounds[2].metrics["fit_sampled"] == 2 and rounds[3].metrics["fit_sampled"] == 2
        assert api.store.get_run("live").status == "completed"


@pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(),
                    reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it as root)")
def test_dashboard_in_headless_chromium_shows_live_rounds_and_an_operator_block(tmp_path: Path) -> None:
    pytest.importorskip("playwright")
    from tests.dashboard_driver import check_dashboard

    cfg = experiment(tmp_path, num_rounds=10)
    run = Federation(cfg).start()
    run.wait_mid_round(1)
    with LiveAPI(cfg.store.url, tmp_path / "secret") as api:
        run.wait_mid_round(2)
        seen = check_dashboard(api.url, api.token("operator"), "live", min_rounds=4, block_client="2", timeout_s=120,
                               screenshot_path=tmp_path / "dashboard.png")
        stop = act(api, api.token("operator"), {"action": "stop"})
        settled(api, api.token("operator"), stop)
        run.join()
        blocked = [a for a in api.store.actions("live") if a.action == "block"]
    assert seen.get("error") is None, seen
    assert seen["console_errors"] == [] and seen["page_errors"] == [] and seen["server_errors"] == []
    assert seen["rounds_shown"] >= 4 and len(set(seen["rounds_seen"])) >= 2  # the page followed the run live
    assert seen["client_status"] == "blocked"
    assert [(a.status, a.params) for a in blocked] == [("applied", {"client": "2"})]
