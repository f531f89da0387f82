"""The one place that composes a server strategy from an experiment's configuration.

Base aggregation rules are Flower's own (``FedAvg``, ``Krum``, ``FedTrimmedAvg``,
``FedMedian``); fedapp's concerns are added as wrappers around them
(:mod:`fedapp.wrappers`). Validation of names and combinations happens in
:func:`check_strategy_config`, called before a run starts.
"""

from __future__ import annotations

import dataclasses
from logging import WARNING
from typing import TYPE_CHECKING, Any, Callable

from flwr.common import NDArrays, Scalar, log, ndarrays_to_parameters
from flwr.server.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum, Strategy

from fedapp.attacks import malicious_clients
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.dp_strategy import CentralDPAccounting, ClientEpsilonRecording, DistributedDPAccounting
from fedapp.exclusion import ClientExclusion, ExclusionList
from fedapp.metrics import RunRecorder
from fedapp.robustness import AnomalyQuarantine
from fedapp.server_momentum import ServerMomentum
from fedapp.validation import UpdateValidation
from fedapp.wrappers import MetricsRecording

if TYPE_CHECKING:
    from fedapp.rounds.workflow import FitRound

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def _common(cfg: ExperimentConfig) -> dict[str, Any]:
    s = cfg.strategy
    return {
        "fraction_fit": s.fraction_fit,
        "fraction_evaluate": s.fraction_evaluate,
        "min_fit_clients": s.min_fit_clients,
        "min_evaluate_clients": s.min_evaluate_clients,
        "min_available_clients": s.min_available_clients,
    }


BASE_STRATEGIES: dict[str, Callable[[ExperimentConfig, dict[str, Any]], Strategy]] = {
    "fedavg": lambda cfg, kw: FedAvg(**kw),
    "fedavgm": lambda cfg, kw: FedAvgM(
        server_learning_rate=cfg.strategy.server_lr, server_momentum=cfg.strategy.server_momentum, **kw
    ),
    "krum": lambda cfg, kw: Krum(num_malicious_clients=cfg.strategy.num_malicious, num_clients_to_keep=0, **kw),
    "multikrum": lambda cfg, kw: Krum(
        num_malicious_clients=cfg.strategy.num_malicious,
        num_clients_to_keep=cfg.strategy.num_clients_to_keep or _multikrum_default_m(cfg),
        **kw,
    ),
    "trimmedmean": lambda cfg, kw: FedTrimmedAvg(beta=cfg.strategy.beta, **kw),
    "median": lambda cfg, kw: FedMedian(**kw),
}


def _multikrum_default_m(cfg: ExperimentConfig) -> int:
    """m = n - f, the largest selection Multi-Krum's guarantee allows."""
    return max(1, clients_per_round(cfg) - cfg.strategy.num_malicious)


def clients_per_round(cfg: ExperimentConfig, available: int | None = None) -> int:
    """How many clients FedAvg's sampling asks for out of ``available`` (default: all ``partition.num_clients``)."""
    n = cfg.partition.num_clients if available is None else available
    return max(cfg.strategy.min_fit_clients, int(n * cfg.strategy.fraction_fit))


def check_strategy_config(cfg: ExperimentConfig) -> None:
    """Unknown names and combinations a rule cannot honour fail here, with the reason."""
    s = cfg.strategy
    if s.name not in BASE_STRATEGIES:
        raise ConfigError(f"unknown strategy {s.name!r}; valid: {sorted(BASE_STRATEGIES)}")
    per_round = clients_per_round(cfg)
    if s.name in ("krum", "multikrum") and per_round <= 2 * s.num_malicious + 2:
        raise ConfigError(
            f"{s.name} tolerates f Byzantine clients only with n > 2f + 2 clients per round; "
            f"got n={per_round}, f={s.num_malicious} (strategy.num_malicious)"
        )
    if s.name == "multikrum" and s.num_clients_to_keep > per_round:
        raise ConfigError(
            f"strategy.num_clients_to_keep={s.num_clients_to_keep} exceeds the {per_round} clients per round"
        )
    _check_secagg_combinations(cfg)
    if cfg.defense.name == "detect" and cfg.privacy.central.enabled:
        raise ConfigError(
            "defense.name='detect' does not combine with privacy.central.enabled: dropping flagged "
            "updates changes how many updates the central-DP noise is calibrated for"
        )
    if cfg.privacy.central.enabled and s.name != "fedavg":
        raise ConfigError(
            f"privacy.central.enabled works only with strategy.name='fedavg', got {s.name!r}: central DP "
            "calibrates its noise to the sensitivity C/m of a mean of m clipped updates, and "
            "Krum, trimmed mean and median select or reorder updates, which changes that analysis"
        )


# Base rules that need only the (weighted) mean of the updates, which is all secure aggregation yields.
# (Under Paillier, fedavgm is FedAvg inside the secure sum with ServerMomentum outside it.)
SECAGG_COMPATIBLE = {"paillier": ("fedavg", "fedavgm"), "secaggplus": ("fedavg", "fedavgm")}


def _check_secagg_combinations(cfg: ExperimentConfig) -> None:
    """Secure aggregation hides each update; refuse whatever must look at one.

    SecAgg+ would not even fail on its own: Flower's workflow hands
    ``aggregate_fit`` every client's result carrying the same unmasked mean, so
    Krum, trimmed mean, median and the detector would silently run on identical
    copies (no robustness at all) and central DP would clip the mean instead of
    each update. Hence a start-up error with the reason.
    """
    method = cfg.secagg.method
    if method == "none":
        return
    s = cfg.strategy
    hides = (
        "the server sees only the encrypted sum of the updates" if method == "paillier"
        else "SecAgg+ hands the strategy only the unmasked mean of the masked updates"
    )
    if s.name not in SECAGG_COMPATIBLE[method]:
        raise ConfigError(
            f"secagg.method={method!r} works only with strategy.name="
            + " or ".join(repr(n) for n in SECAGG_COMPATIBLE[method])
            + f", got "
            f"{s.name!r}: {hides}, and Krum, trimmed mean and median must compare or sort the individual "
            "updates, which is exactly what secure aggregation hides"
        )
    if cfg.privacy.central.enabled:
        raise ConfigError(
            f"secagg.method={method!r} and privacy.central.enabled do not combine: central DP clips each "
            "update on the server, which never sees one; use client DP-SGD instead"
            + (" or secagg.noise_sigma_total (distributed DP)" if method == "paillier" else "")
        )
    if cfg.defense.name == "detect":
        raise ConfigError(
            f"defense.name='detect' does not combine with secagg.method={method!r}: the detector scores "
            f"each client's update, and {hides}"
        )


def build_strategy(
    cfg: ExperimentConfig,
    *,
    initial_parameters: NDArrays,
    evaluate_fn: EvaluateFn | None,
    recorder: RunRecorder,
    on_fit_config_fn: Callable[[int], dict[str, Scalar]] | None = None,
    rounds: FitRound | None = None,
) -> Strategy:
    """Base rule from ``strategy.name``, wrapped with privacy, validation, exclusion and recording.

    Outermost first: recording, client exclusion (declined replies never reach
    validation), client-epsilon recording, update validation, anomaly detection
    and quarantine (scores only well-formed updates; shares the exclusion list),
    central DP, base rule. With Paillier, server momentum (``fedavgm``),
    distributed-DP accounting (if ``secagg.noise_sigma_total`` > 0) and Paillier
    secure aggregation around plain FedAvg take the place of update validation.
    """
    check_strategy_config(cfg)
    kwargs = _common(cfg) | {
        "initial_parameters": ndarrays_to_parameters(initial_parameters),
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": on_fit_config_fn,
        "on_evaluate_config_fn": on_fit_config_fn,
        "fit_metrics_aggregation_fn": _weighted_mean,
        "evaluate_metrics_aggregation_fn": _weighted_mean,
    }
    momentum_outside = cfg.secagg.method == "paillier" and cfg.strategy.name == "fedavgm"
    strategy = FedAvg(**kwargs) if momentum_outside else BASE_STRATEGIES[cfg.strategy.name](cfg, kwargs)
    central = cfg.privacy.central
    if central.enabled:
        strategy = CentralDPAccounting(
            strategy,
            noise_multiplier=central.noise_multiplier,
            clipping_norm=central.clipping_norm,
            num_sampled_clients=min(clients_per_round(cfg), cfg.partition.num_clients),
            num_clients=cfg.partition.num_clients,
            delta=central.delta,
            recorder=recorder,
        )
    excluded = ExclusionList()
    if cfg.defense.name == "detect":
        d = cfg.defense
        strategy = AnomalyQuarantine(
            strategy,
            min_fit_clients=cfg.strategy.min_fit_clients,
            threshold=d.threshold,
            reputation_weight=d.reputation_weight,
            quarantine_below=d.quarantine_below,
            release_after=d.release_after,
            drop_flagged=d.drop_flagged,
            num_malicious=cfg.strategy.num_malicious,
            excluded=excluded,
            recorder=recorder,
            # evaluation only: precision/recall in the round rows, never a decision
            ground_truth={str(pid) for pid in malicious_clients(cfg.attack, cfg.partition.num_clients)},
        )
    if cfg.secagg.method == "paillier":
        # Ciphertexts are validated by the wrapper itself (round, key, replay, length).
        strategy = _paillier(cfg, strategy, recorder)
        if cfg.secagg.noise_sigma_total > 0:
            strategy = _distributed_dp(cfg, strategy, recorder)
        if momentum_outside:  # post-processing of the released mean: no privacy cost
            strategy = ServerMomentum(
                strategy, server_lr=cfg.strategy.server_lr, momentum=cfg.strategy.server_momentum
            )
    else:
        # SecAgg+ hands every client the same unmasked mean: single updates cannot be checked
        # (their clients' own clip bounds them), only the mean's shapes and finiteness.
        settings = cfg.validation if cfg.secagg.method == "none" else dataclasses.replace(
            cfg.validation, max_update_norm=0.0, relative_norm_bound=0.0, replay_check=False
        )
        strategy = UpdateValidation(strategy, recorder, settings, strict_dtype=cfg.secagg.method == "none")
    if cfg.privacy.client.enabled:
        strategy = ClientEpsilonRecording(strategy, recorder)
    strategy = ClientExclusion(
        strategy, min_fit_clients=cfg.strategy.min_fit_clients, recorder=recorder, excluded=excluded
    )
    return MetricsRecording(strategy, recorder, rounds)


def _paillier(cfg: ExperimentConfig, strategy: Strategy, recorder: RunRecorder) -> Strategy:
    """FedAvg inside Paillier secure aggregation; the server loads the public key only."""
    from fedapp.crypto import load_public_key
    from fedapp.crypto.dealing import is_threshold_key_dir
    from fedapp.crypto.protocol import settings_for
    from fedapp.crypto.threshold import load_threshold_params
    from fedapp.secagg import PaillierSecureAggregation

    public_key = load_public_key(cfg.secagg.key_dir)
    threshold = load_threshold_params(cfg.secagg.key_dir) if is_threshold_key_dir(cfg.secagg.key_dir) else None
    if public_key.bits != cfg.secagg.key_bits:
        raise ConfigError(
            f"the key in {cfg.secagg.key_dir} has {public_key.bits} bits but secagg.key_bits={cfg.secagg.key_bits}"
        )
    return PaillierSecureAggregation(
        strategy,
        public_key=public_key,
        settings=settings_for(cfg.secagg, cfg.partition.num_clients),
        decryptors=cfg.secagg.decryptors,
        seed=cfg.seed,
        threshold=threshold,
        recorder=recorder,
    )


def _distributed_dp(cfg: ExperimentConfig, strategy: Strategy, recorder: RunRecorder) -> Strategy:
    """User-level accounting of the clients' noise shares, directly around Paillier secure aggregation.

    The shares are sized for ``partition.num_clients`` (as ``settings_for`` does);
    the wrapper books each round at the contributors actually in the sum.
    """
    from fedapp.crypto import Quantizer, distributed_noise_std

    sa, n = cfg.secagg, cfg.partition.num_clients
    share = distributed_noise_std(sa.noise_sigma_total, n)
    if share > sa.bound / 4:
        log(
            WARNING,
            "distributed DP: each client's noise share (std %.3g) is above secagg.bound/4 = %.3g; noisy "
            "coordinates beyond +-bound are clipped, which the Gaussian accounting does not cover: raise secagg.bound",
            share, sa.bound / 4,
        )
    step = Quantizer(bound=sa.bound, bits=sa.bits).step
    if step > share / 10:
        log(
            WARNING,
            "distributed DP: the fixed-point step 2*bound/(2^bits-1) = %.3g is not far below the noise share "
            "(std %.3g); the accounting treats the sum as real-valued Gaussian: raise secagg.bits",
            step, share,
        )
    return DistributedDPAccounting(
        strategy,
        noise_sigma_total=sa.noise_sigma_total,
        clip_norm=sa.clip_norm,
        calibrated_for=n,
        num_sampled_clients=min(clients_per_round(cfg), n),
        num_clients=n,
        delta=sa.noise_delta,
        recorder=recorder,
    )


def _weighted_mean(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Sample-weighted mean of the numeric metrics all clients reported (ids excluded)."""
    total = sum(n for n, _ in metrics)
    if not metrics or total == 0:
        return {}
    keys = set.intersection(*(set(m) for _, m in metrics)) - {"partition_id"}
    out: dict[str, Scalar] = {}
    for key in sorted(keys):
        values = [(n, m[key]) for n, m in metrics]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in values):
            out[key] = sum(n * float(v) for n, v in values) / total
    return out

