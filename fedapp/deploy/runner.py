"""One experiment, end to end: on a loopback federation started here, or on a running SuperLink.

Both paths share the same guarantees, which is why they live together: bad config
or missing data fail before any process starts, ``flwr run`` gets a staged copy of
the app and a private ``FLWR_HOME``, the run's final status is checked, and every
process started is stopped before the function returns, also on failure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from fedapp.components import check_experiment
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.deploy.credentials import generate_certificates, generate_node_keys
from fedapp.deploy.errors import LaunchError
from fedapp.deploy.flwr_commands import register_node, run_to_completion, write_connection
from fedapp.deploy.processes import (
    Launch,
    environment,
    executable,
    free_ports,
    start,
    stop_all,
    wait_until_healthy,
)
from fedapp.deploy.staging import project_root, stage_app
from fedapp.deploy.watch import NodeSpec, RunWatcher
from fedapp.faults.plan import node_schedule
from fedapp.rounds.progress import PROGRESS_FILE
from fedapp.runconfig import write_run_config_toml
from fedapp.store.settings import prepare_run


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
    if not cfg.store.resume:  # never follow (or act on) a previous run's progress
        (out / PROGRESS_FILE).unlink(missing_ok=True)
    run_config = write_run_config_toml(cfg, out / "run_config.toml")

    deadline = time.monotonic() + cfg.runtime.timeout_s
    workdir = Path(tempfile.mkdtemp(prefix="fedapp-launch-"))
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir()
    launch = Launch(marker=uuid.uuid4().hex)
    env = environment(flwr_home, launch.marker)
    log(INFO, "Logs of every process: %s; progress: %s", logs, out / PROGRESS_FILE)
    try:
        app_dir = stage_app(project_root(), workdir / "app")
        nodes = _start_federation(launch, cfg, env, flwr_home, deadline, node_auth=node_auth)
        watcher = RunWatcher(launch, env, logs, out / PROGRESS_FILE, schedule=node_schedule(cfg.faults), nodes=nodes)
        run_to_completion(launch, env, app_dir, run_config, logs, deadline, watcher.tick)
    except LaunchError:
        log(ERROR, "The run failed; logs of every process in %s", logs)
        raise
    finally:
        stop_all(launch)
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
    launch = Launch(marker=uuid.uuid4().hex)
    env = environment(workdir / "flwr-home", launch.marker)
    ca = Path(root_certificates).resolve() if root_certificates else None
    # The ServerApp writes its progress on the SuperLink's machine; follow it when that folder is
    # visible here, else echo `flwr run --stream` (the ServerApp's log).
    progress = Path(cfg.runtime.output_dir) / PROGRESS_FILE
    visible = progress.parent.is_dir()
    watcher = RunWatcher(launch, env, logs, progress if visible else None, stream_log=logs / "flwr-run.log")
    log(INFO, "Submitting to %s; logs in %s%s", superlink, logs, f"; progress: {progress}" if visible else "")
    try:
        write_connection(workdir / "flwr-home", superlink, ca)
        app_dir = stage_app(project_root(), workdir / "app")
        run_config = write_run_config_toml(cfg, workdir / "run_config.toml")
        status, run_id = run_to_completion(launch, env, app_dir, run_config, logs, deadline, watcher.tick)
    finally:
        stop_all(launch)
        for temporary in ("flwr-home", "app"):  # the logs stay for a post-mortem
            shutil.rmtree(workdir / temporary, ignore_errors=True)
    result: dict[str, Any] = {"run_id": run_id, "status": status}
    summary_path = Path(cfg.runtime.output_dir) / "summary.json"
    if summary_path.is_file():
        result["summary"] = json.loads(summary_path.read_text())
    return result


def _start_federation(
    launch: Launch, cfg: ExperimentConfig, env: dict[str, str], flwr_home: Path, deadline: float, *, node_auth: bool
) -> dict[int, NodeSpec]:
    """SuperLink (healthy), then one SuperNode per partition; the CLI connection to it. How each node was started."""
    out = Path(cfg.runtime.output_dir)
    logs = out / "logs"
    port, *node_ports = free_ports(cfg.runtime.superlink_port, cfg.partition.num_clients)
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
    write_connection(flwr_home, address, ca_cert)

    start(launch, "superlink", logs, env, [
        executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", *link_tls,
        *(["--enable-supernode-auth"] if node_auth else []),
    ])  # fmt: skip
    wait_until_healthy(launch, address, ca_cert, deadline)
    num = cfg.partition.num_clients
    nodes: dict[int, NodeSpec] = {}
    for i, node_port in enumerate(node_ports):
        auth = []
        if node_auth:
            private_key, public_key = generate_node_keys(out / "keys", f"supernode-{i}")
            register_node(env, public_key, logs)
            auth = ["--auth-supernode-private-key", str(private_key)]
        command = [
            executable("flower-supernode"), "--superlink", address, "--port", str(node_port),
            "--node-config", node_config(cfg, i), *node_tls, *auth,
        ]  # fmt: skip
        start(launch, f"supernode-{i}", logs, env, command)
        nodes[i] = NodeSpec(i, f"supernode-{i}", command)
    log(INFO, "SuperLink on %s (tls=%s, node auth=%s), %d SuperNodes; logs in %s",
        address, cfg.runtime.tls, node_auth, num, logs)  # fmt: skip
    return nodes


def node_config(cfg: ExperimentConfig, partition_id: int) -> str:
    """What the operator pins on SuperNode ``partition_id`` (:mod:`fedapp.node_policy`): the run cannot weaken it."""
    from fedapp.node_policy import FAULT_INJECTION, KEY_DIR, LEDGER_DIR, PRIVACY_MODE, SIMULATED_ATTACKS
    from fedapp.release import privacy_mode

    pins = [f"partition-id={partition_id}", f"num-partitions={cfg.partition.num_clients}",
            f'{PRIVACY_MODE}="{privacy_mode(cfg)}"']
    if cfg.secagg.key_dir:
        pins.append(f'{KEY_DIR}="{Path(cfg.secagg.key_dir).resolve()}"')
    if cfg.privacy.client.ledger_dir:
        pins.append(f'{LEDGER_DIR}="{Path(cfg.privacy.client.ledger_dir).resolve()}"')
    if cfg.attack.name != "none":  # the launcher runs a test federation: its own simulated attackers are allowed
        pins.append(f'{SIMULATED_ATTACKS}="allow"')
    if cfg.faults.kind != "none":  # ... and its own injected faults
        pins.append(f'{FAULT_INJECTION}="allow"')
    return " ".join(pins)


def _absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose output folder is absolute (the ServerApp runs in another cwd)."""
    raw = cfg.to_dict()
    raw["runtime"]["output_dir"] = str(Path(cfg.runtime.output_dir).expanduser().resolve())
    raw["runtime"]["mode"] = "processes"
    return prepare_run(ExperimentConfig.from_dict(raw))
