"""Carry an :class:`ExperimentConfig` through Flower's flat ``run_config``.

``flwr run`` hands apps ``[tool.flwr.app.config]`` (nested TOML tables) merged with
``--run-config`` overrides, flattened to dotted keys by Flower. These helpers use
Flower's own flatten/unflatten so the mapping is exactly Flower's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import tomli_w
from flwr.common.config import flatten_dict, unflatten_dict

from fedapp.config import ExperimentConfig


def experiment_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Validated experiment from a (flat) Flower run config."""
    return ExperimentConfig.from_dict(unflatten_dict(dict(run_config)))


def experiment_to_run_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Flat dotted-key form, as Flower stores it."""
    return flatten_dict(cfg.to_dict())


def write_run_config_toml(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write ``cfg`` as a TOML file for ``flwr run --run-config <file>``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(tomli_w.dumps(cfg.to_dict()).encode())
    return out
