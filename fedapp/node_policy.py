"""What a SuperNode's operator pins, so that the server's run configuration cannot weaken it.

Under ``flwr run`` the experiment reaches a client as the run configuration,
which whoever submits the run writes. A malicious server could switch the
privacy mode off, point ``secagg.key_dir`` at another deal (or a legacy
single-key folder), start a fresh ``ledger_dir`` to reset the budget, or turn
every other client into a "simulated attacker" that sends nothing. The node's
own configuration (``flower-supernode --node-config``) is written by the
client's operator, so it wins:

* ``privacy-mode``: the run's privacy mode (:func:`fedapp.release.privacy_mode`)
  must be exactly this one, else the client refuses the run;
* ``secagg-key-dir`` / ``ledger-dir``: replace the run's values;
* simulated attacks (``attack.name``) are refused unless ``simulated-attacks=allow``
  (they exist to evaluate defences in a test federation, never in production);
* injected faults (``faults.kind``: crash, exit, hang, malformed updates, ...) are
  refused unless ``fault-injection=allow``: a submitter must not be able to crash
  or stall another operator's node.

In the simulation engine the experiment is built in-process from the
researcher's own config and none of this applies.
"""

from __future__ import annotations

from dataclasses import replace
from logging import INFO
from typing import Any, Mapping

from flwr.common import log

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.release import SURFACES, privacy_mode

PRIVACY_MODE = "privacy-mode"
KEY_DIR = "secagg-key-dir"
LEDGER_DIR = "ledger-dir"
SIMULATED_ATTACKS = "simulated-attacks"
FAULT_INJECTION = "fault-injection"


def pin_to_node(cfg: ExperimentConfig, node_config: Mapping[str, Any]) -> ExperimentConfig:
    """``cfg`` (from the run configuration) with the node's pins applied, or a :class:`ConfigError`."""
    pinned_mode = node_config.get(PRIVACY_MODE)
    if pinned_mode is not None:
        if str(pinned_mode) not in SURFACES:
            raise ConfigError(f"node config {PRIVACY_MODE}={pinned_mode!r}; valid: {sorted(SURFACES)}")
        if privacy_mode(cfg) != str(pinned_mode):
            raise ConfigError(
                f"the run asks for privacy mode {privacy_mode(cfg)!r} but this node is pinned to {pinned_mode!r} "
                f"(--node-config {PRIVACY_MODE}=...): refusing the run"
            )
    if cfg.attack.name != "none" and str(node_config.get(SIMULATED_ATTACKS, "")) != "allow":
        raise ConfigError(
            f"the run makes this node a simulated attacker (attack.name={cfg.attack.name!r}); refused unless the "
            f"node is started with --node-config {SIMULATED_ATTACKS}=allow"
        )
    if cfg.faults.kind != "none" and str(node_config.get(FAULT_INJECTION, "")) != "allow":
        raise ConfigError(
            f"the run injects faults on this node (faults.kind={cfg.faults.kind!r}); refused unless the node is "
            f"started with --node-config {FAULT_INJECTION}=allow"
        )
    secagg, client_dp = cfg.secagg, cfg.privacy.client
    if KEY_DIR in node_config:
        secagg = replace(secagg, key_dir=str(node_config[KEY_DIR]))
    if LEDGER_DIR in node_config:
        client_dp = replace(client_dp, ledger_dir=str(node_config[LEDGER_DIR]))
    if (secagg, client_dp) != (cfg.secagg, cfg.privacy.client):
        log(INFO, "node config pins secagg.key_dir=%s, privacy.client.ledger_dir=%s", secagg.key_dir,
            client_dp.ledger_dir)
    return replace(cfg, secagg=secagg, privacy=replace(cfg.privacy, client=client_dp))
