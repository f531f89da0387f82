"""Run one fedapp experiment (or a Hydra ``-m`` sweep of them).

    python simulations/run.py                                  # default experiment
    python simulations/run.py +experiment=fedavg_mnist_iid     # a named preset
    python simulations/run.py -m partition=iid,dirichlet seed=0,1   # a sweep
    python simulations/run.py +experiment=smoke runtime=processes   # real SuperLink/SuperNodes

Each run writes into its Hydra output folder: ``.hydra/config.yaml`` (resolved
config), ``experiment.json``, ``metrics.json``/``metrics.csv`` per round,
``clients.jsonl``, ``events.jsonl``, ``rounds.png`` and ``summary.json``.
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


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, validate, run; return the final test accuracy (for sweepers)."""
    _log_once()
    try:
        experiment = to_experiment(cfg)
        experiment.runtime.output_dir = HydraConfig.get().runtime.output_dir
        if experiment.runtime.mode == "processes":
            from fedapp.deploy import run_in_processes as run
        else:
            from fedapp.simulation import run_in_simulation as run
        summary = run(experiment)
    except (ConfigError, DataUnavailableError) as err:
        log.error("fedapp: %s", err)
        sys.exit(2)
    print(f"\n== {experiment.name}: summary ({experiment.runtime.output_dir}) ==")
    print(json.dumps(summary, indent=2))
    return summary.get("final_test_accuracy")


if __name__ == "__main__":
    main()
