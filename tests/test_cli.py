"""The ``fedapp`` command: user mistakes are one line and exit 2, tampering exits 1, nothing is lost.

The store here is filled by :class:`DurableRun` directly (no Ray), so these run in seconds.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedapp.cli import app
from fedapp.components import new_model
from fedapp.config import ExperimentConfig
from fedapp.store.audit import generate_audit_key
from fedapp.store.durable import AUDIT_FILE, DurableRun
from fedapp.strategies import build_strategy
from fedapp.training import get_weights

runner = CliRunner()


def _run(tmp_path: Path, *, audit_key: str = "") -> tuple[str, str]:
    """A finished two-round run in a store under ``tmp_path``; its (store URL, run id)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = ExperimentConfig.from_dict({
        "name": "cli", "num_rounds": 2,
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 300, "synthetic_test_size": 100},
        "partition": {"num_clients": 3}, "runtime": {"output_dir": str(tmp_path / "run")},
        "store": {"url": url, "audit_key": audit_key},
    })
    durable, recorder = DurableRun.open(cfg)
    strategy = build_strategy(cfg, initial_parameters=get_weights(new_model(cfg)), evaluate_fn=None, recorder=recorder)
    model = get_weights(new_model(cfg))
    for r in range(3):
        recorder.record(r, fit_clients=3 if r else 0, test_accuracy=0.1 * r)
        for c in ("0", "1", "2") if r else ():
            recorder.client(r, c, num_examples=1, epsilon=0.5 * r)
        if r == 2:
            recorder.event("update_rejected", r, "array 0 has shape (1,), expected (3,)", client="2")
        durable.round_done(r, model, strategy)
    durable.finish("completed")
    return url, durable.run.run_id


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def test_runs_list_show_and_export(tmp_path: Path) -> None:
    url, run_id = _run(tmp_path)
    listed = invoke("runs", "list", "--store", url, "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout.splitlines()[0])["run_id"] == run_id
    shown = invoke("runs", "show", run_id, "--store", url)
    assert shown.exit_code == 0 and "completed" in shown.stdout and "refused" in shown.stdout
    exported = invoke("runs", "export", run_id, "--store", url)
    data = json.loads(exported.stdout)
    assert data["run"]["status"] == "completed" and len(data["rounds"]) == 3
    assert {(u["round"], u["client"], u["status"]) for u in data["updates"] if u["round"] == 2} == {
        (2, "0", "accepted"), (2, "1", "accepted"), (2, "2", "refused")}
    as_csv = invoke("runs", "export", run_id, "--store", url, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == 6 and {r["epsilon"] for r in rows if r["round"] == "2"} == {"1.0"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs", "show", "nope"], "no run 'nope'"),
        (["resume", "nope"], "no run 'nope'"),
        (["audit", "verify", "nope"], "no run 'nope'"),
        (["runs", "export", "RUN", "--format", "xml"], "--format must be json or csv"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    url, run_id = _run(tmp_path)
    result = invoke(*[run_id if a == "RUN" else a for a in args], "--store", url)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_store_and_completed_resume_are_refused(tmp_path: Path) -> None:
    missing = invoke("runs", "list", "--store", f"sqlite:///{tmp_path / 'absent.db'}")
    assert missing.exit_code == 2 and "no run store at" in missing.stderr
    url, run_id = _run(tmp_path)
    again = invoke("resume", run_id, "--store", url)
    assert again.exit_code == 2 and "already completed" in again.stderr


def test_audit_verify_passes_then_catches_an_edit_with_the_pinned_key(tmp_path: Path) -> None:
    private, public = generate_audit_key(tmp_path / "keys")
    url, run_id = _run(tmp_path, audit_key=str(private))
    ok = invoke("audit", "verify", run_id, "--store", url, "--public-key", str(public))
    assert ok.exit_code == 0 and "OK" in ok.stdout
    audit = tmp_path / "run" / AUDIT_FILE
    lines = audit.read_text().splitlines()
    spend = next(i for i, line in enumerate(lines) if '"privacy_spend"' in line)
    entry = json.loads(lines[spend])
    entry["fields"]["epsilon"] = 0.01  # the insider lowers a recorded privacy spend
    lines[spend] = json.dumps(entry)
    audit.write_text("\n".join(lines) + "\n")
    bad = invoke("audit", "verify", run_id, "--store", url, "--public-key", str(public))
    assert bad.exit_code == 1 and f"entry {spend + 1}" in bad.stdout


def test_keys_audit_refuses_to_overwrite(tmp_path: Path) -> None:
    first = invoke("keys", "audit", "--dir", str(tmp_path))
    assert first.exit_code == 0 and (tmp_path / "audit_ed25519.pem").exists()
    second = invoke("keys", "audit", "--dir", str(tmp_path))
    assert second.exit_code == 2


def test_help_everywhere() -> None:
    for args in (["--help"], ["runs", "--help"], ["runs", "list", "--help"], ["resume", "--help"],
                 ["audit", "verify", "--help"], ["keys", "--help"], ["launch", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "usage" in result.stdout.lower(), (args, result.stdout)
