"""The Hydra runner: compose, validate and run one experiment (or a ``-m`` sweep).

``simulations/run.py`` and ``fedapp run`` both call :func:`main`; the output
folder is Hydra's, the run store is :mod:`fedapp.store`'s. Exit codes: 0 done,
1 the run failed (it trained nothing, or a process failed), 2 a user mistake
(one line: bad config, missing data, unknown run to resume, corrupt checkpoint).
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedapp.config import ConfigError
from fedapp.datasets import DataUnavailableError
from fedapp.hydra_config import CONF_DIR, register_schema, to_experiment

register_schema()
log = logging.getLogger("fedapp")


def _log_once() -> None:
    """Flower's logger has its own console handler and also propagates to the
    handlers Hydra installs (console + run log file): keep Hydra's, so each line
    shows once and lands in the run's log file, at INFO."""
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    FLOWER_LOGGER.removeHandler(console_handler)
    FLOWER_LOGGER.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the request was wrong", reported as one line and exit 2."""
    from fedapp.store.audit import AuditError
    from fedapp.store.checkpoint import CheckpointError
    from fedapp.store.db import StoreError

    return (ConfigError, DataUnavailableError, CheckpointError, AuditError, StoreError)


def failed_run_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the run failed" (faults, a broken model, a process that died): exit 1, one line."""
    from fedapp.deploy.errors import LaunchError
    from fedapp.rounds.outcomes import RunFailed

    return (RunFailed, LaunchError)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, validate, run; return the final test accuracy (for sweepers)."""
    _log_once()
    try:
        experiment = to_experiment(cfg)
        if not experiment.store.resume:
            experiment.runtime.output_dir = HydraConfig.get().runtime.output_dir
        summary = run_experiment_here(experiment)
    except user_errors() as err:
        log.error("fedapp: %s", err)
        sys.exit(2)
    except failed_run_errors() as err:
        log.error("fedapp: run failed: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        sys.exit(1)
    print(f"\n== {experiment.name}: summary ({summary.get('output_dir', experiment.runtime.output_dir)}) ==")
    print(json.dumps(summary, indent=2))
    if summary.get("status") == "failed":
        log.error("fedapp: run %s failed: %s", summary.get("run_id"), summary.get("error", "see the log above"))
        sys.exit(1)
    return summary.get("final_test_accuracy")


def run_experiment_here(experiment) -> dict:  # type: ignore[no-untyped-def]
    """Run in the configured mode (simulation engine or real processes); the summary."""
    if experiment.runtime.mode == "processes":
        from fedapp.deploy import run_in_processes as run
    else:
        from fedapp.simulation import run_in_simulation as run
    return run(experiment)
