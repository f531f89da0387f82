"""Run an experiment in Flower's simulation engine (Ray backend).

Configuration reaches the apps by closure (``run_simulation`` hands apps an empty
``run_config``); results are written by the ServerApp into ``runtime.output_dir``.
``runtime.ray_address`` joins an existing Ray cluster instead of starting one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from fedapp.components import check_experiment
from fedapp.config import ExperimentConfig
from fedapp.rounds.outcomes import RunFailed
from fedapp.store.settings import prepare_run


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Ray resources per virtual client, and the cluster to join if any."""
    rt = cfg.runtime
    config: dict[str, Any] = {
        "client_resources": {"num_cpus": rt.num_cpus_per_client, "num_gpus": rt.num_gpus_per_client},
        # Without an address Ray would join any Ray already running on this host
        # (another experiment's), whose CPUs are taken: start our own instead.
        "init_args": {"log_to_driver": False, "address": rt.ray_address or "local"},
    }
    return config


def run_in_simulation(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train ``cfg`` with ``partition.num_clients`` virtual SuperNodes; return the summary."""
    cfg = prepare_run(cfg)  # an unknown run to resume or an unreachable store fails first, in one line
    check_experiment(cfg)  # bad config or missing data fail before Ray starts
    from flwr.simulation import run_simulation

    from fedapp.client_app import make_client_app
    from fedapp.server_app import make_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=make_server_app(cfg),
                client_app=make_client_app(cfg),
                num_supernodes=cfg.partition.num_clients,
                backend_config=backend_config(cfg),
            )
        except RuntimeError as err:  # Flower wraps the ServerApp's own reason; give it back
            if isinstance(err.__cause__, RunFailed):
                raise err.__cause__ from None
            raise
    summary_path = Path(cfg.runtime.output_dir) / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
