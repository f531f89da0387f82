"""``fedapp-launch``: the deployment paths from a shell, configured like the Hydra runner.

Overrides are parsed as TOML values (``runtime.tls=true`` is a bool, a bare word a
string), so one experiment file and a few ``section.key=value`` words cover both
the one-machine launcher and submitting to a running SuperLink.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from logging import ERROR
from pathlib import Path
from typing import Any, Sequence

from flwr.common import log

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.deploy.errors import LaunchError
from fedapp.deploy.runner import run_in_processes, submit_run


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
    except ConfigError as err:  # a user mistake: one line, exit 2 (as every fedapp entry point)
        log(ERROR, "%s", err)
        return 2
    except (LaunchError, OSError) as err:
        log(ERROR, "%s", err)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
