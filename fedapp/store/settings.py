"""Where the run store lives and what identifies a run's configuration.

One place for both, because the launcher, the ServerApp and the ``fedapp``
command must agree: the store URL is resolved to an absolute SQLite path
*before* a run starts (a SuperLink's ServerApp process has another working
directory), and the config hash that a resume is checked against leaves out
only what may legitimately differ between two attempts of one run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedapp.config import ExperimentConfig

STORE_URL_ENV = "FEDAPP_STORE_URL"
DEFAULT_DB = Path("outputs") / "fedapp.db"

# Keys that may change between attempts of one run without changing what it computes.
_VOLATILE = {
    "store": None,  # the whole section: where it is recorded, not what is trained
    "tracking": None,  # where metrics are mirrored (TensorBoard), not what is trained
    "runtime": ("output_dir", "superlink_port", "ray_address", "timeout_s"),
    "dataset": ("root",),
}


def resolve_store_url(url: str = "") -> str:
    """``url``, else ``$FEDAPP_STORE_URL``, else SQLite at ``./outputs/fedapp.db``; SQLite paths made absolute."""
    chosen = url or os.environ.get(STORE_URL_ENV, "") or f"sqlite:///{DEFAULT_DB}"
    prefix = "sqlite:///"
    if chosen.startswith(prefix) and chosen != "sqlite:///:memory:":
        path = Path(chosen[len(prefix):])
        if not path.is_absolute():
            chosen = prefix + str(path.resolve())
    return chosen


def has_password(url: str) -> bool:
    """Whether a SQLAlchemy URL carries a password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:  # noqa: BLE001 - a malformed URL fails later, with its own message
        return False


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparseable store URL>"


def run_config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of the config without the volatile keys (a resume must match it)."""
    raw = cfg.to_dict()
    for section, keys in _VOLATILE.items():
        if keys is None:
            raw.pop(section, None)
        else:
            for key in keys:
                raw.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prepare_run(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fix the run's identity before it starts: absolute store URL and audit key path, and a run id.

    Done by whoever starts the run (simulation, launcher), so the id is known to
    the caller (it is printed, and ``fedapp resume`` takes it) and every process
    of the run writes to the same store.
    """
    if not cfg.store.enabled:
        return cfg
    raw = cfg.to_dict()
    st = raw["store"]
    st["url"] = resolve_store_url(cfg.store.url)
    if has_password(st["url"]):
        # A password must not travel in the config: it is stored with the run, written to experiment.json
        # and run_config.toml, and Flower hands the run config to every ClientApp. The ServerApp (same
        # process, or a SuperLink child that inherits this environment) reads it from the environment.
        os.environ[STORE_URL_ENV] = st["url"]
        st["url"] = ""
    if cfg.store.audit_key:
        st["audit_key"] = str(Path(cfg.store.audit_key).expanduser().resolve())
    if cfg.store.resume:  # the run's own folder: its audit log, checkpoints and tables continue there
        from fedapp.store.db import RunStore

        store = RunStore(st["url"], retries=cfg.store.retries)
        try:
            raw["runtime"]["output_dir"] = store.get_run(cfg.store.resume).output_dir
        finally:
            store.close()
    elif not cfg.store.run_id:
        from fedapp.store.durable import new_run_id

        st["run_id"] = new_run_id(cfg.name)
    return ExperimentConfig.from_dict(raw)
