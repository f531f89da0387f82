"""Run an experiment as real Flower processes on this machine (``runtime.mode=processes``).

The simulation engine (:mod:`fedapp.simulation`) runs every client inside one Ray
cluster; this launcher runs the *deployment* path instead: one ``flower-superlink``,
``partition.num_clients`` ``flower-supernode`` processes and ``flwr run``, exactly the
commands a multi-machine setup uses (see ``docs/deployment.md``), only on loopback.
It is the honest check that the apps work when every message starts a new ClientApp
process and all state crosses a network boundary.

Why the extra bookkeeping:

- ``flwr run --stream`` exits 0 even when the ServerApp raised, so the run's final
  status is read back with ``flwr ls --format json`` and a failed run raises.
- The SuperLink starts a *detached* SuperExec (its own session), which starts the
  ServerApp; killing our direct children is not enough. Every process we start
  carries a marker environment variable, and at the end every process that still
  carries it is terminated.
- A temporary ``FLWR_HOME`` holds the CLI connection, so the user's ``~/.flwr`` is
  neither read nor modified, and ``flwr run`` gets a staged copy of the app
  (:func:`stage_app`), because it rewrites the ``pyproject.toml`` it is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Sequence

import tomli_w
from flwr.common import log

from fedapp.components import check_experiment
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.runconfig import write_run_config_toml

CONNECTION = "fedapp-launch"
"""Name of the SuperLink connection written into the temporary ``FLWR_HOME``."""

MARKER_ENV = "FEDAPP_LAUNCH_ID"
"""Environment variable inherited by every process of one launch (for cleanup)."""

STARTUP_TIMEOUT_S = 60.0
STATUS_COMPLETED = "finished:completed"


class LaunchError(RuntimeError):
    """The processes could not be started, the run failed, or it ran out of time."""


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path


@dataclass
class _Launch:
    """Everything one launch started, so ``finally`` can stop all of it."""

    marker: str
    procs: list[_Proc] = field(default_factory=list)
    log_files: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------- public API


def run_in_processes(cfg: ExperimentConfig, *, node_auth: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on a loopback SuperLink with one SuperNode per partition.

    ``node_auth`` (needs ``runtime.tls``) starts the SuperLink with
    ``--enable-supernode-auth``, gives every SuperNode its own EC key pair and
    registers the public keys with ``flwr supernode register`` first, so the
    SuperLink admits only those nodes.

    Returns the summary the ServerApp writes to ``<runtime.output_dir>/summary.json``
    (the same dict as :func:`fedapp.simulation.run_in_simulation`). Raises
    :class:`LaunchError` (a ``RuntimeError``) when a process cannot start, when the
    run ends in any state but ``finished:completed``, or after ``runtime.timeout_s``.
    All processes started here are stopped before this function returns.
    """
    check_experiment(cfg)  # bad config or missing data fail here, before any process starts
    if node_auth and not cfg.runtime.tls:
        raise ConfigError("node_auth requires runtime.tls=true (Flower authenticates SuperNodes only over TLS)")
    cfg = _absolute(cfg)
    out = Path(cfg.runtime.output_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # never return a previous run's summary
    run_config = write_run_config_toml(cfg, out / "run_config.toml")

    deadline = time.monotonic() + cfg.runtime.timeout_s
    workdir = Path(tempfile.mkdtemp(prefix="fedapp-launch-"))
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir()
    launch = _Launch(marker=uuid.uuid4().hex)
    env = _environment(flwr_home, launch.marker)
    try:
        app_dir = stage_app(project_root(), workdir / "app")
        _start_federation(launch, cfg, env, flwr_home, deadline, node_auth=node_auth)
        _run_to_completion(launch, env, app_dir, run_config, logs, deadline)
    finally:
        _stop_all(launch)
        shutil.rmtree(workdir, ignore_errors=True)

    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise LaunchError(f"the run completed without writing {summary_path}; see the logs in {logs}")
    return json.loads(summary_path.read_text())


def submit_run(cfg: ExperimentConfig, superlink: str, *, root_certificates: str | Path | None = None) -> dict[str, Any]:
    """Run ``cfg`` on an existing SuperLink (``host:port``) whose SuperNodes are already up.

    The multi-machine path: nothing is started here but ``flwr run`` itself, and the
    run's final status is checked the same way as in :func:`run_in_processes`
    (``LaunchError`` unless ``finished:completed``). ``root_certificates`` is the CA
    that signed the SuperLink's certificate (``None``: plain, insecure connection).
    The ServerApp writes its outputs on the SuperLink's machine, at
    ``runtime.output_dir`` as that machine sees it; the returned dict holds
    ``run_id``, ``status`` and, when that folder is readable here too, ``summary``.
    """
    check_experiment(cfg, load_data=False)  # the data lives on the SuperLink/SuperNode machines
    raw = cfg.to_dict()
    raw["runtime"]["mode"] = "processes"
    cfg = ExperimentConfig.from_dict(raw)
    deadline = time.monotonic() + cfg.runtime.timeout_s
    workdir = Path(tempfile.mkdtemp(prefix="fedapp-submit-"))
    logs = workdir / "logs"
    logs.mkdir()
    (workdir / "flwr-home").mkdir()
    launch = _Launch(marker=uuid.uuid4().hex)
    env = _environment(workdir / "flwr-home", launch.marker)
    ca = Path(root_certificates).resolve() if root_certificates else None
    try:
        _write_connection(workdir / "flwr-home", superlink, ca)
        app_dir = stage_app(project_root(), workdir / "app")
        run_config = write_run_config_toml(cfg, workdir / "run_config.toml")
        status, run_id = _run_to_completion(launch, env, app_dir, run_config, logs, deadline)
    finally:
        _stop_all(launch)
        for temporary in ("flwr-home", "app"):  # the logs stay for a post-mortem
            shutil.rmtree(workdir / temporary, ignore_errors=True)
    result: dict[str, Any] = {"run_id": run_id, "status": status}
    summary_path = Path(cfg.runtime.output_dir) / "summary.json"
    if summary_path.is_file():
        result["summary"] = json.loads(summary_path.read_text())
    return result


def project_root() -> Path:
    """The Flower app directory ``flwr run`` packages into a FAB.

    ``$FEDAPP_PROJECT_ROOT`` if set, else the checkout this package is imported from
    (editable install), else the working directory; it must hold a ``pyproject.toml``
    with a ``[tool.flwr.app]`` table.
    """
    candidates = [os.environ.get("FEDAPP_PROJECT_ROOT", ""), Path(__file__).resolve().parents[1], Path.cwd()]
    for candidate in candidates:
        if not candidate:
            continue
        pyproject = Path(candidate) / "pyproject.toml"
        if pyproject.is_file() and "flwr" in tomllib.loads(pyproject.read_text()).get("tool", {}):
            return Path(candidate).resolve()
    raise LaunchError(
        "cannot find the Flower app (a pyproject.toml with [tool.flwr.app]); "
        "set FEDAPP_PROJECT_ROOT to the project directory"
    )


def stage_app(root: str | Path, dest: str | Path) -> Path:
    """Copy the Flower app's ``pyproject.toml`` and its packages into ``dest/fedapp``.

    ``flwr run <dir>`` is not read-only: Flower 1.41 rewrites a ``pyproject.toml``
    that still has ``[tool.flwr.federations]`` (it comments the table out and moves
    it to ``$FLWR_HOME``), and it walks the whole directory (a multi-GB ``.venv``)
    before filtering. Running a staged copy leaves the checkout untouched and makes
    the FAB exactly: ``pyproject.toml`` plus the ``*.py`` files of the packages named
    in ``[tool.flwr.app.components]``. In the staged ``pyproject.toml`` the
    federations are removed and ``[tool.flwr.app.config]`` is rebuilt from
    :class:`ExperimentConfig`'s defaults, because Flower rejects ``--run-config``
    keys that the app config lacks: the schema comes from the code, never from a
    hand-kept copy that may lag behind a new config field. The folder is named
    ``fedapp`` because Flower requires the app folder's name to be a valid app name.
    """
    src = Path(root)
    config = tomllib.loads((src / "pyproject.toml").read_text())
    config["tool"]["flwr"].pop("federations", None)
    config["tool"]["flwr"]["app"]["config"] = ExperimentConfig().to_dict()
    components = config["tool"]["flwr"]["app"]["components"]
    packages = sorted({ref.split(":")[0].split(".")[0] for ref in components.values()})
    app_dir = Path(dest) / "fedapp"
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(config))
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                target = app_dir / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return app_dir


def generate_certificates(directory: str | Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for ``host``, written as PEM files.

    gRPC checks the server's subject alternative name, so the server certificate
    names ``host`` as an IP (or DNS) SAN. Returns ``(ca.crt, server.pem, server.key)``.
    For tests and a single trusted host; use a real CA for a deployment.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=30)}

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedapp test CA")])
    ca_cert = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)  # fmt: skip
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
            public_key=server_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = (folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(server_cert.public_bytes(pem))
    paths[2].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def generate_node_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair for one SuperNode, in OpenSSH format.

    The SuperNode signs its requests with the private key
    (``--auth-supernode-private-key``); the SuperLink admits it only after the public
    key was registered (``flwr supernode register``). Returns ``(private, public)``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


# --------------------------------------------------------------------------- helpers


def _start_federation(
    launch: _Launch, cfg: ExperimentConfig, env: dict[str, str], flwr_home: Path, deadline: float, *, node_auth: bool
) -> None:
    """SuperLink (healthy), then one SuperNode per partition; the CLI connection to it."""
    out = Path(cfg.runtime.output_dir)
    logs = out / "logs"
    port, *node_ports = _free_ports(cfg.runtime.superlink_port, cfg.partition.num_clients)
    if port != cfg.runtime.superlink_port:
        log(WARNING, "Port %d is busy; the SuperLink uses port %d", cfg.runtime.superlink_port, port)
    address = f"127.0.0.1:{port}"
    ca_cert = None
    link_tls = node_tls = ["--insecure"]
    if cfg.runtime.tls:
        ca_cert, server_cert, server_key = generate_certificates(out / "certs")
        link_tls = ["--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(server_cert),
                    "--ssl-keyfile", str(server_key)]  # fmt: skip
        node_tls = ["--root-certificates", str(ca_cert)]
    _write_connection(flwr_home, address, ca_cert)

    _start(launch, "superlink", logs, env, [
        _executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", *link_tls,
        *(["--enable-supernode-auth"] if node_auth else []),
    ])  # fmt: skip
    _wait_until_healthy(launch, address, ca_cert, deadline)
    num = cfg.partition.num_clients
    for i, node_port in enumerate(node_ports):
        auth = []
        if node_auth:
            private_key, public_key = generate_node_keys(out / "keys", f"supernode-{i}")
            _register_node(env, public_key, logs)
            auth = ["--auth-supernode-private-key", str(private_key)]
        _start(launch, f"supernode-{i}", logs, env, [
            _executable("flower-supernode"), "--superlink", address, "--port", str(node_port),
            "--node-config", f"partition-id={i} num-partitions={num}", *node_tls, *auth,
        ])  # fmt: skip
    log(INFO, "SuperLink on %s (tls=%s, node auth=%s), %d SuperNodes; logs in %s",
        address, cfg.runtime.tls, node_auth, num, logs)  # fmt: skip


def _register_node(env: dict[str, str], public_key: Path, logs: Path) -> None:
    """``flwr supernode register`` one public key with our SuperLink."""
    result = subprocess.run(
        [_executable("flwr"), "supernode", "register", str(public_key), CONNECTION],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    with (logs / "register.log").open("a") as fh:
        fh.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise LaunchError(f"registering {public_key} failed: {result.stdout}{result.stderr}")


def _absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose output folder is absolute (the ServerApp runs in another cwd)."""
    raw = cfg.to_dict()
    raw["runtime"]["output_dir"] = str(Path(cfg.runtime.output_dir).expanduser().resolve())
    raw["runtime"]["mode"] = "processes"
    return ExperimentConfig.from_dict(raw)


def _environment(flwr_home: Path, marker: str) -> dict[str, str]:
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


def _executable(name: str) -> str:
    """The console script beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found beside {sys.executable} nor on PATH; is flwr installed?")
    return found


def _free_ports(preferred: int, count: int) -> list[int]:
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


def _write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with one connection to our SuperLink."""
    conn: dict[str, Any] = {"address": address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca_cert)
    config = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def _start(launch: _Launch, name: str, logs: Path, env: dict[str, str], command: list[str]) -> _Proc:
    """Start ``command`` in its own process group, output to ``logs/<name>.log``."""
    log_path = logs / f"{name}.log"
    handle = log_path.open("wb")
    launch.log_files.append(handle)
    popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc = _Proc(name, popen, log_path)
    launch.procs.append(proc)
    return proc


def _wait_until_healthy(launch: _Launch, address: str, ca_cert: Path | None, deadline: float) -> None:
    """Poll the SuperLink's ``/health`` endpoint until it answers."""
    import httpx

    scheme = "https" if ca_cert else "http"
    verify: Any = str(ca_cert) if ca_cert else False
    limit = min(deadline, time.monotonic() + STARTUP_TIMEOUT_S)
    while time.monotonic() < limit:
        _check_alive(launch)
        try:
            if httpx.get(f"{scheme}://{address}/health", timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise LaunchError(f"the SuperLink did not answer on {address} in time; see {launch.procs[0].log_path}")


def _check_alive(launch: _Launch) -> None:
    """Raise when a server process (SuperLink, SuperNode) has exited."""
    for proc in launch.procs:
        if proc.name != "flwr-run" and proc.popen.poll() is not None:
            raise LaunchError(
                f"{proc.name} exited with code {proc.popen.returncode}; last lines of "
                f"{proc.log_path}:\n{_tail(proc.log_path)}"
            )


def _wait_for(launch: _Launch, run_proc: _Proc, deadline: float) -> None:
    """Wait for ``flwr run`` while watching the servers and the deadline."""
    while run_proc.popen.poll() is None:
        _check_alive(launch)
        if time.monotonic() > deadline:
            raise LaunchError(f"the run exceeded runtime.timeout_s; logs in {run_proc.log_path.parent}")
        time.sleep(0.5)
    if run_proc.popen.returncode != 0:
        raise LaunchError(
            f"flwr run exited with code {run_proc.popen.returncode}; last lines of "
            f"{run_proc.log_path}:\n{_tail(run_proc.log_path)}"
        )


def _run_to_completion(
    launch: _Launch, env: dict[str, str], app_dir: Path, run_config: Path, logs: Path, deadline: float
) -> tuple[str, str]:
    """``flwr run --stream``, then insist on ``finished:completed`` (it exits 0 on failure)."""
    run_proc = _start(launch, "flwr-run", logs, env, [
        _executable("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--stream",
    ])  # fmt: skip
    try:
        _wait_for(launch, run_proc, deadline)
        status, run_id = _final_status(env, deadline, _started_run_id(run_proc))
    except LaunchError:
        _stop_run(env, _started_run_id(run_proc))  # a shared SuperLink would go on running it
        raise
    if status != STATUS_COMPLETED:
        raise LaunchError(
            f"run {run_id} ended with status {status!r} (expected {STATUS_COMPLETED!r}); "
            f"logs in {logs}. Last lines of the run's log:\n{_tail(run_proc.log_path)}"
        )
    return status, run_id


def _started_run_id(run_proc: _Proc) -> str | None:
    """The run id ``flwr run`` printed, if it got that far."""
    started = re.search(r"Successfully started run (\d+)", run_proc.log_path.read_text(errors="replace"))
    return started.group(1) if started else None


def _stop_run(env: dict[str, str], run_id: str | None) -> None:
    """Best effort ``flwr stop``: the run may be finished or the SuperLink gone."""
    if run_id is None:
        return
    try:
        subprocess.run([_executable("flwr"), "stop", run_id, CONNECTION], env=env,
                       capture_output=True, timeout=20, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        log(WARNING, "flwr stop %s did not answer", run_id)


def _final_status(env: dict[str, str], deadline: float, run_id: str | None) -> tuple[str, str]:
    """Status of run ``run_id`` (or of the only run on the SuperLink), once it is finished."""
    status = "unknown"
    command = [_executable("flwr"), "ls", CONNECTION, "--format", "json"]
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


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_all(launch: _Launch) -> None:
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


# --------------------------------------------------------------------------- CLI


def load_experiment(config_file: str | Path | None, overrides: Sequence[str]) -> ExperimentConfig:
    """Experiment from a TOML file (nested tables, or a pyproject's
    ``[tool.flwr.app.config]``) with ``section.key=value`` overrides (TOML values)."""
    raw: dict[str, Any] = {}
    if config_file:
        raw = tomllib.loads(Path(config_file).read_text())
        raw = raw.get("tool", {}).get("flwr", {}).get("app", {}).get("config", raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word is a string: dataset.name=mnist
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    raw.setdefault("runtime", {})["mode"] = "processes"
    return ExperimentConfig.from_dict(raw)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedapp-launch [--config exp.toml] [key=value ...]``: run, print the summary."""
    parser = argparse.ArgumentParser(
        prog="fedapp-launch",
        description="Run a fedapp experiment as real Flower processes (1 SuperLink + N SuperNodes) on this host.",
    )
    parser.add_argument("--config", help="experiment TOML (nested tables as in [tool.flwr.app.config])")
    parser.add_argument("overrides", nargs="*", help="overrides such as num_rounds=3 partition.num_clients=2")
    parser.add_argument("--node-auth", action="store_true", help="authenticate SuperNodes (needs runtime.tls=true)")
    parser.add_argument("--superlink", metavar="HOST:PORT",
                        help="submit to this running SuperLink instead of starting processes here")  # fmt: skip
    parser.add_argument("--root-certificates", metavar="CA.PEM", help="with --superlink: CA of its TLS certificate")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.config, args.overrides)
        if args.superlink:
            summary = submit_run(cfg, args.superlink, root_certificates=args.root_certificates)
        else:
            summary = run_in_processes(cfg, node_auth=args.node_auth)
    except (ConfigError, LaunchError, OSError) as err:
        log(ERROR, "%s", err)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
