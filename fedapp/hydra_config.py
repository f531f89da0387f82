"""Hydra at the edge: the typed schema for ``conf/`` and composition by name.

``ExperimentConfig`` is registered as Hydra's ``base_config`` so every group file
and every command-line override is type-checked against the dataclasses; the
composed result is then validated once more by :meth:`ExperimentConfig.from_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fedapp.config import ExperimentConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_schema() -> None:
    """Make ``base_config`` (the dataclass schema) available to ``conf/config.yaml``."""
    ConfigStore.instance().store(name="base_config", node=ExperimentConfig)


def to_experiment(cfg: DictConfig | dict[str, Any]) -> ExperimentConfig:
    """Resolved Hydra config (without its ``hydra`` node) as a validated experiment."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    return ExperimentConfig.from_dict(raw)


def compose_experiment(overrides: Sequence[str] = (), config_dir: Path = CONF_DIR) -> ExperimentConfig:
    """Compose ``conf/`` with Hydra overrides (e.g. ``["+experiment=smoke"]``) outside ``@hydra.main``."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=list(overrides)))
