"""The ``flwr`` CLI calls of a launch: connection, node registration, run, final status.

``flwr run --stream`` exits 0 even when the ServerApp raised, so the run's final
status is read back with ``flwr ls --format json`` and a failed run raises. The
connection lives in a temporary ``$FLWR_HOME`` (see :func:`write_connection`), so
the user's ``~/.flwr`` is neither read nor modified.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from logging import WARNING
from pathlib import Path
from typing import Any, Callable

import tomli_w
from flwr.common import log

from fedapp.deploy.errors import LaunchError
from fedapp.deploy.processes import Launch, Proc, executable, start, tail, wait_for

CONNECTION = "fedapp-launch"
"""Name of the SuperLink connection written into the temporary ``FLWR_HOME``."""

STATUS_COMPLETED = "finished:completed"


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with one connection to our SuperLink."""
    conn: dict[str, Any] = {"address": address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca_cert)
    config = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def register_node(env: dict[str, str], public_key: Path, logs: Path) -> None:
    """``flwr supernode register`` one public key with our SuperLink."""
    result = subprocess.run(
        [executable("flwr"), "supernode", "register", str(public_key), CONNECTION],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    with (logs / "register.log").open("a") as fh:
        fh.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise LaunchError(f"registering {public_key} failed: {result.stdout}{result.stderr}")


def run_to_completion(
    launch: Launch, env: dict[str, str], app_dir: Path, run_config: Path, logs: Path, deadline: float,
    tick: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """``flwr run --stream``, then insist on ``finished:completed`` (it exits 0 on failure).

    ``tick`` is called about twice a second while the run goes (the launcher's live
    progress and node faults, :mod:`fedapp.deploy.watch`), and once more at the end.
    """
    run_proc = start(launch, "flwr-run", logs, env, [
        executable("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--stream",
    ])  # fmt: skip
    try:
        wait_for(launch, run_proc, deadline, tick)
        status, run_id = _final_status(env, deadline, _started_run_id(run_proc))
        if tick is not None:
            tick()
    except LaunchError:
        _stop_run(env, _started_run_id(run_proc))  # a shared SuperLink would go on running it
        raise
    if status != STATUS_COMPLETED:
        reason = _failure_details(env, run_id)
        raise LaunchError(
            f"run {run_id} ended with status {status!r}{f': {reason}' if reason else ''}; "
            f"logs in {logs}. Last lines of the run's log:\n{tail(run_proc.log_path)}"
        )
    return status, run_id


def _failure_details(env: dict[str, str], run_id: str | None) -> str:
    """The one line the ServerApp failed with, as the SuperLink recorded it (``flwr ls --run-id``)."""
    if run_id is None:
        return ""
    try:
        result = subprocess.run([executable("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        runs = json.loads(result.stdout).get("runs", [])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
        return ""
    details = next((str(r.get("details") or r.get("status-details") or "") for r in runs), "")
    return details.replace("ServerApp failed with exception: ", "").splitlines()[0] if details else ""


def _started_run_id(run_proc: Proc) -> str | None:
    """The run id ``flwr run`` printed, if it got that far."""
    started = re.search(r"Successfully started run (\d+)", run_proc.log_path.read_text(errors="replace"))
    return started.group(1) if started else None


def _stop_run(env: dict[str, str], run_id: str | None) -> None:
    """Best effort ``flwr stop``: the run may be finished or the SuperLink gone."""
    if run_id is None:
        return
    try:
        subprocess.run([executable("flwr"), "stop", run_id, CONNECTION], env=env,
                       capture_output=True, timeout=20, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        log(WARNING, "flwr stop %s did not answer", run_id)


def _final_status(env: dict[str, str], deadline: float, run_id: str | None) -> tuple[str, str]:
    """Status of run ``run_id`` (or of the only run on the SuperLink), once it is finished."""
    status = "unknown"
    command = [executable("flwr"), "ls", CONNECTION, "--format", "json"]
    if run_id is not None:
        command += ["--run-id", run_id]
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
        try:
            runs = json.loads(result.stdout)["runs"]
        except (json.JSONDecodeError, KeyError) as err:
            raise LaunchError(f"cannot read `flwr ls` output: {result.stdout!r} {result.stderr!r}") from err
        if run_id is None and len(runs) != 1:
            raise LaunchError(f"cannot tell which run is ours: `flwr ls` lists {len(runs)} runs")
        mine = [r for r in runs if run_id is None or r["run-id"] == run_id]
        if mine:
            status, run_id = mine[0]["status"], mine[0]["run-id"]
            if status.startswith("finished"):
                return status, str(run_id)
        if time.monotonic() > deadline:
            raise LaunchError(f"run {run_id} still {status!r} when runtime.timeout_s ran out")
        time.sleep(0.5)
