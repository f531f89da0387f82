"""What an operator may ask of a running run, and which requests its configuration cannot honour.

One place decides validity, so the API (which refuses at once with 409) and
the ServerApp (which checks again when it applies, against the settings then in
force) give the same answer with the same reason. The reasons are privacy and
robustness arguments, not style rules: a rule switch under secure aggregation
would run Krum on copies of one unmasked mean; a new number of clients per
round under central or distributed DP would change the sampling rate the
accountant has been booking.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fedapp.config import ConfigError, ExperimentConfig
from fedapp.rounds.outcomes import LABEL
from fedapp.strategies import BASE_STRATEGIES, check_strategy_config

ACTION_KINDS = ("block", "unblock", "set_rule", "set_clients_per_round", "pause", "resume", "stop")
RULES = tuple(BASE_STRATEGIES)
BLOCK_CODE = "operator_block"  # the exclusion's reason code for a client an operator blocked


class ActionError(ValueError):
    """A malformed request (unknown action, missing or bad parameter): the caller's mistake, a 422."""


@dataclass(frozen=True)
class Settings:
    """The run's settings that actions change: the rule in force and the clients sampled per round (None: the config's)."""

    rule: str
    clients_per_round: int | None = None


def action_params(action: str, *, client: str | None = None, rule: str | None = None,
                  clients_per_round: int | None = None) -> dict[str, Any]:
    """The parameters ``action`` takes, checked for form; :class:`ActionError` names what is wrong."""
    if action not in ACTION_KINDS:
        raise ActionError(f"unknown action {action!r}; valid: {', '.join(ACTION_KINDS)}")
    given = {k for k, v in (("client", client), ("rule", rule), ("clients_per_round", clients_per_round)) if v is not None}
    needed = {"block": {"client"}, "unblock": {"client"}, "set_rule": {"rule"},
              "set_clients_per_round": {"clients_per_round"}}.get(action, set())
    if given != needed:
        want = ", ".join(sorted(needed)) or "no parameter"
        raise ActionError(f"action {action!r} takes {want}; got {', '.join(sorted(given)) or 'none'}")
    if client is not None and not LABEL.match(client):
        raise ActionError("client must be a client label (letters, digits, '_', '.', '-'; at most 40), e.g. 3 or node-123")
    if rule is not None and rule not in RULES:
        raise ActionError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    if clients_per_round is not None and (isinstance(clients_per_round, bool) or clients_per_round < 1):
        raise ActionError("clients_per_round must be an integer >= 1")
    return {k: v for k, v in (("client", client), ("rule", rule), ("clients_per_round", clients_per_round)) if v is not None}


def refusal(cfg: ExperimentConfig, settings: Settings, action: str, params: dict[str, Any]) -> str | None:
    """Why the run cannot take this action under ``settings`` (None: it can)."""
    if action == "set_rule":
        return _rule_refusal(cfg, settings, str(params["rule"]))
    if action == "set_clients_per_round":
        return _clients_refusal(cfg, settings, int(params["clients_per_round"]))
    return None


def _rule_refusal(cfg: ExperimentConfig, settings: Settings, rule: str) -> str | None:
    if rule == settings.rule:
        return f"the rule in force is already {rule}"
    if rule == "fedavgm":
        return "switching to fedavgm is refused: server momentum is a history of the model's steps from round 1, which a switch mid-run does not have"
    method = cfg.secagg.method
    if method != "none":
        return (
            f"switching the aggregation rule is refused under secure aggregation (secagg.method={method}): the server "
            "never sees single updates, so a rule that compares or sorts them would run on copies of one mean"
        )
    if cfg.privacy.central.enabled:
        return (
            "switching the aggregation rule is refused under central DP: its noise is calibrated to the sensitivity "
            "C/m of a mean of m clipped updates, which a rule that selects or sorts updates changes"
        )
    try:
        check_strategy_config(_configured(cfg, settings.clients_per_round, rule))
    except ConfigError as err:
        return f"{rule} cannot run here: {err}"
    return None


def _clients_refusal(cfg: ExperimentConfig, settings: Settings, k: int) -> str | None:
    n, s = cfg.partition.num_clients, cfg.strategy
    if k > n:
        return f"clients_per_round={k} exceeds the run's {n} clients (partition.num_clients)"
    if k < s.min_fit_clients:
        return f"clients_per_round={k} is below strategy.min_fit_clients={s.min_fit_clients}: every round would fail"
    if cfg.privacy.central.enabled or cfg.secagg.noise_sigma_total > 0:
        which = "central DP" if cfg.privacy.central.enabled else "distributed DP (secagg.noise_sigma_total)"
        return (
            f"changing clients per round is refused under {which}: the accountant books every round at the sampling "
            "rate q = clients per round / clients fixed when the run started, and the noise is sized for it"
        )
    if cfg.secagg.method == "secaggplus":
        return "changing clients per round is refused under SecAgg+: its shares and reconstruction threshold are sized for the configured number"
    if cfg.secagg.method == "paillier" and k < cfg.secagg.min_contributors:
        return f"clients_per_round={k} is below secagg.min_contributors={cfg.secagg.min_contributors}: no sum could be decrypted"
    try:
        check_strategy_config(_configured(cfg, k, settings.rule))
    except ConfigError as err:
        return f"clients_per_round={k} does not suit {settings.rule}: {err}"
    return None


def _configured(cfg: ExperimentConfig, clients_per_round: int | None, rule: str) -> ExperimentConfig:
    """``cfg`` as the run now stands (for the strategy checks): its rule and its clients per round."""
    strategy = dataclasses.replace(cfg.strategy, name=rule)
    if clients_per_round is not None:
        # fraction 0 and a minimum of k is exactly k per round (k / n * n need not round back to k)
        strategy = dataclasses.replace(strategy, fraction_fit=0.0, min_fit_clients=clients_per_round)
    return dataclasses.replace(cfg, strategy=strategy)


def settings_after(cfg: ExperimentConfig, applied: list[tuple[str, dict[str, Any]]]) -> Settings:
    """The settings in force after the applied ``(action, params)`` in order (the API's view of a live run)."""
    settings = Settings(rule=cfg.strategy.name)
    for action, params in applied:
        if action == "set_rule":
            settings = dataclasses.replace(settings, rule=str(params["rule"]))
        elif action == "set_clients_per_round":
            settings = dataclasses.replace(settings, clients_per_round=int(params["clients_per_round"]))
    return settings


__all__ = ["ACTION_KINDS", "BLOCK_CODE", "RULES", "ActionError", "Settings", "action_params", "refusal", "settings_after"]
