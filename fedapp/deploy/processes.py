"""Start, watch and stop the SuperLink, the SuperNodes and ``flwr run`` as child processes.

The SuperLink starts a *detached* SuperExec (its own session), which starts the
ServerApp; killing our direct children is not enough. Every process started here
carries a marker environment variable (:data:`MARKER_ENV`), and at the end every
process that still carries it is terminated. Each process writes to its own log
file, because the last lines of that log are the only useful error message when
a process dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any, Callable

from flwr.common import log

from fedapp.deploy.errors import LaunchError

MARKER_ENV = "FEDAPP_LAUNCH_ID"
"""Environment variable inherited by every process of one launch (for cleanup)."""

STARTUP_TIMEOUT_S = 60.0


@dataclass
class Proc:
    """One started process and the log that explains its death."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    expected_exit: bool = False  # killed on purpose (faults.node_schedule)
    reported: bool = False  # its exit has been logged


@dataclass
class Launch:
    """Everything one launch started, so ``finally`` can stop all of it."""

    marker: str
    procs: list[Proc] = field(default_factory=list)
    log_files: list[Any] = field(default_factory=list)


def environment(flwr_home: Path, marker: str) -> dict[str, str]:
    """The parent's environment, plus the venv on PATH, a private FLWR_HOME and the marker."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env[MARKER_ENV] = marker
    return env  # FEDAPP_DATA_ROOT and the rest pass through unchanged


def executable(name: str) -> str:
    """The console script beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found beside {sys.executable} nor on PATH; is flwr installed?")
    return found


def free_ports(preferred: int, count: int) -> list[int]:
    """``preferred`` (or a free port if it is taken) followed by ``count`` other free ports."""
    held: list[socket.socket] = []
    try:
        ports = []
        for wanted in [preferred] + [0] * count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
            try:
                sock.bind(("127.0.0.1", wanted))
            except OSError:
                sock.bind(("127.0.0.1", 0))
            held.append(sock)
            ports.append(sock.getsockname()[1])
        return ports
    finally:
        for sock in held:
            sock.close()


def start(
    launch: Launch, name: str, logs: Path, env: dict[str, str], command: list[str], *, append: bool = False
) -> Proc:
    """Start ``command`` in its own process group, output to ``logs/<name>.log`` (``append``: a restart)."""
    log_path = logs / f"{name}.log"
    handle = log_path.open("ab" if append else "wb")
    launch.log_files.append(handle)
    popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc = Proc(name, popen, log_path)
    launch.procs.append(proc)
    return proc


def wait_until_healthy(launch: Launch, address: str, ca_cert: Path | None, deadline: float) -> None:
    """Poll the SuperLink's ``/health`` endpoint until it answers."""
    import httpx

    scheme = "https" if ca_cert else "http"
    verify: Any = str(ca_cert) if ca_cert else False
    limit = min(deadline, time.monotonic() + STARTUP_TIMEOUT_S)
    while time.monotonic() < limit:
        check_alive(launch)
        try:
            if httpx.get(f"{scheme}://{address}/health", timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise LaunchError(f"the SuperLink did not answer on {address} in time; see {launch.procs[0].log_path}")


def check_alive(launch: Launch, *, nodes_may_die: bool = False) -> None:
    """Raise when the SuperLink (or, before the run, a SuperNode) has exited.

    Once the run is going (``nodes_may_die``) a SuperNode that exits is a lost
    node: it is logged and the ServerApp's deadlines and node accounting decide
    whether the run can go on without it.
    """
    for proc in launch.procs:
        if proc.name == "flwr-run" or proc.popen.poll() is None:
            continue
        if nodes_may_die and proc.name.startswith("supernode"):
            from fedapp.deploy.watch import report_node_exit

            report_node_exit(proc)
            continue
        raise LaunchError(
            f"{proc.name} exited with code {proc.popen.returncode}; last lines of "
            f"{proc.log_path}:\n{tail(proc.log_path)}"
        )


def wait_for(launch: Launch, run_proc: Proc, deadline: float, tick: Callable[[], None] | None = None) -> None:
    """Wait for ``flwr run`` while watching the servers and the deadline; ``tick`` runs every half second."""
    while run_proc.popen.poll() is None:
        check_alive(launch, nodes_may_die=True)
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            raise LaunchError(f"the run exceeded runtime.timeout_s; logs in {run_proc.log_path.parent}")
        time.sleep(0.5)
    if run_proc.popen.returncode != 0:
        raise LaunchError(
            f"flwr run exited with code {run_proc.popen.returncode}; last lines of "
            f"{run_proc.log_path}:\n{tail(run_proc.log_path)}"
        )


def tail(path: Path, lines: int = 40) -> str:
    """The end of a log, for an error message; a missing log must not hide the error."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_all(launch: Launch) -> None:
    """Terminate every process of this launch, politely first, then by force."""
    for proc in reversed(launch.procs):  # clients and CLI first, the SuperLink last
        if proc.popen.poll() is None:
            _signal_group(proc.popen.pid, signal.SIGTERM)
    stragglers = [p for p in launch.procs if not _wait_quietly(p.popen, 10.0)]
    for proc in stragglers:
        _signal_group(proc.popen.pid, signal.SIGKILL)
        _wait_quietly(proc.popen, 5.0)
    for proc in launch.procs:
        _signal_group(proc.popen.pid, signal.SIGKILL)  # children left in the group
    _kill_marked(launch.marker)
    for handle in launch.log_files:
        handle.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_quietly(popen: subprocess.Popen, timeout: float) -> bool:
    try:
        popen.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _marked_pids(marker: str) -> list[int]:
    """PIDs whose environment carries ``MARKER_ENV=marker`` (Linux ``/proc``)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in pids if pid != os.getpid()]


def _kill_marked(marker: str) -> None:
    """Stop detached descendants (SuperExec, ServerApp, ClientApps) that outlived their parents."""
    if not Path("/proc").is_dir():
        return
    for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
        pids = _marked_pids(marker)
        if not pids:
            return
        if sig == signal.SIGKILL:
            log(WARNING, "Killing %d leftover Flower process(es): %s", len(pids), pids)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + pause
        while time.monotonic() < end and _marked_pids(marker):
            time.sleep(0.1)
    if _marked_pids(marker):
        log(ERROR, "Flower processes of this launch are still running: %s", _marked_pids(marker))
