"""The rules an :class:`~fedapp.config.ExperimentConfig` must satisfy: ranges and combinations.

Kept apart from the dataclasses so that each reads on its own: ``config.py``
says what can be configured, this module what is allowed and why not.
Imports nothing of fedapp but the configuration classes; registries of names
(datasets, models, strategies) are checked by :func:`fedapp.components.check_experiment`.
"""

from __future__ import annotations

from fedapp.config import (
    AttackConfig,
    ClientConfig,
    ClientDPConfig,
    ConfigError,
    DefenseConfig,
    ExperimentConfig,
    PrivacyConfig,
    SecAggConfig,
)


_RUN_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _validate_store(cfg: ExperimentConfig) -> None:
    st = cfg.store
    _positive_int("store.checkpoint_every", st.checkpoint_every)
    _positive_int("store.keep_checkpoints", st.keep_checkpoints)
    if st.retries < 0:
        raise ConfigError(f"store.retries must be >= 0, got {st.retries}")
    for key in ("run_id", "resume"):
        value = getattr(st, key)
        if value and (len(value) > 80 or not set(value) <= _RUN_ID_CHARS):
            raise ConfigError(f"store.{key} must be up to 80 letters, digits, '-', '_' or '.', got {value!r}")
    if st.resume and not st.enabled:
        raise ConfigError("store.resume needs store.enabled=true: a run is resumed from its record in the store")


def validate_experiment(cfg: ExperimentConfig) -> None:
    """Check ranges and cross-field consistency; raise :class:`ConfigError` naming key and range."""
    _positive_int("num_rounds", cfg.num_rounds)
    d, p, c, s, r = cfg.dataset, cfg.partition, cfg.client, cfg.strategy, cfg.runtime
    _in_range("dataset.val_fraction", d.val_fraction, 0.0, 0.9, low_open=False)
    for key in ("max_train_samples", "max_test_samples"):
        if getattr(d, key) < 0:
            raise ConfigError(f"dataset.{key} must be >= 0 (0 = all), got {getattr(d, key)}")
    _positive_int("dataset.synthetic_train_size", d.synthetic_train_size)
    _positive_int("dataset.synthetic_test_size", d.synthetic_test_size)
    _positive_int("partition.num_clients", p.num_clients)
    if p.alpha <= 0:
        raise ConfigError(f"partition.alpha must be > 0, got {p.alpha}")
    _positive_int("partition.shards_per_client", p.shards_per_client)
    if p.min_partition_size < 1:
        raise ConfigError(f"partition.min_partition_size must be >= 1, got {p.min_partition_size}")
    _positive_int("client.local_epochs", c.local_epochs)
    _positive_int("client.batch_size", c.batch_size)
    if c.lr <= 0:
        raise ConfigError(f"client.lr must be > 0, got {c.lr}")
    _in_range("client.momentum", c.momentum, 0.0, 1.0, low_open=False, high_open=True)
    _in_range("client.lr_decay", c.lr_decay, 0.0, 1.0)
    _in_range("strategy.server_lr", s.server_lr, 0.0, 10.0)
    _in_range("strategy.server_momentum", s.server_momentum, 0.0, 1.0, low_open=False, high_open=True)
    if c.weight_decay < 0:
        raise ConfigError(f"client.weight_decay must be >= 0, got {c.weight_decay}")
    _in_range("strategy.fraction_fit", s.fraction_fit, 0.0, 1.0)
    if not 0.0 <= s.fraction_evaluate <= 1.0:
        raise ConfigError(
            f"strategy.fraction_evaluate must be in [0, 1] (0 disables federated "
            f"evaluation), got {s.fraction_evaluate}"
        )
    for key in ("min_fit_clients", "min_evaluate_clients", "min_available_clients"):
        value = getattr(s, key)
        _positive_int(f"strategy.{key}", value)
        if value > p.num_clients:
            raise ConfigError(
                f"strategy.{key}={value} exceeds partition.num_clients={p.num_clients}: "
                "the run would wait forever for clients that do not exist"
            )
    if s.num_malicious < 0:
        raise ConfigError(f"strategy.num_malicious must be >= 0, got {s.num_malicious}")
    if s.num_clients_to_keep < 0:
        raise ConfigError(f"strategy.num_clients_to_keep must be >= 0, got {s.num_clients_to_keep}")
    _in_range("strategy.beta", s.beta, 0.0, 0.5, low_open=False, high_open=True)
    if r.mode not in ("simulation", "processes"):
        raise ConfigError(f"runtime.mode must be 'simulation' or 'processes', got {r.mode!r}")
    if r.num_cpus_per_client <= 0:
        raise ConfigError(f"runtime.num_cpus_per_client must be > 0, got {r.num_cpus_per_client}")
    if r.num_gpus_per_client < 0:
        raise ConfigError(f"runtime.num_gpus_per_client must be >= 0, got {r.num_gpus_per_client}")
    _positive_int("runtime.eval_batch_size", r.eval_batch_size)
    _positive_int("runtime.eval_every", r.eval_every)
    _in_range("runtime.superlink_port", r.superlink_port, 1024, 65535, low_open=False, high_open=False)
    _positive_int("runtime.timeout_s", r.timeout_s)
    _validate_store(cfg)
    _validate_privacy(cfg.privacy)
    _validate_secagg(cfg.secagg, p.num_clients)
    _validate_distributed_dp(cfg.secagg, cfg.privacy)
    _validate_shared_noise_dp(cfg.privacy.client, cfg.secagg, c)
    _validate_shared_noise_secaggplus(cfg)
    _validate_robustness(cfg.attack, cfg.defense, p.num_clients)
    _validate_faults(cfg)


def _validate_faults(cfg: ExperimentConfig) -> None:
    """Deadlines, failure tolerance, update-norm bounds and injected faults."""
    from fedapp.faults.plan import validate_faults

    s, v = cfg.strategy, cfg.validation
    if s.round_timeout_s < 0:
        raise ConfigError(f"strategy.round_timeout_s must be >= 0 (0 = no deadline), got {s.round_timeout_s}")
    if s.max_failed_rounds < 0:
        raise ConfigError(f"strategy.max_failed_rounds must be >= 0, got {s.max_failed_rounds}")
    if s.node_wait_s < 0:
        raise ConfigError(f"strategy.node_wait_s must be >= 0, got {s.node_wait_s}")
    if v.max_update_norm < 0 or v.relative_norm_bound < 0:
        raise ConfigError(
            f"validation.max_update_norm and validation.relative_norm_bound must be >= 0 (0 = off), "
            f"got {v.max_update_norm}, {v.relative_norm_bound}"
        )
    if v.max_num_examples < 1:
        raise ConfigError(f"validation.max_num_examples must be >= 1, got {v.max_num_examples}")
    if 0 < v.relative_norm_bound <= 1:
        raise ConfigError(
            f"validation.relative_norm_bound={v.relative_norm_bound} would refuse half of the honest updates "
            "(it multiplies the round's median norm); use a factor > 1, e.g. 10, or 0 to turn it off"
        )
    validate_faults(cfg.faults, cfg.partition.num_clients, cfg.num_rounds)
    if cfg.runtime.mode == "simulation" and (cfg.faults.kind == "exit" or cfg.faults.node_schedule):
        raise ConfigError(
            "faults.kind=exit and faults.node_schedule kill processes: in the simulation engine a ClientApp "
            "runs in a Ray worker shared by many clients; use runtime.mode=processes (or faults.kind=crash)"
        )


def _validate_robustness(a: AttackConfig, d: DefenseConfig, num_clients: int) -> None:
    """Ranges of the attack and defense settings; names are resolved by the check before a run."""
    _in_range("attack.fraction", a.fraction, 0.0, 1.0, low_open=False, high_open=True)
    ids = a.client_ids()
    if any(i >= num_clients for i in ids):
        raise ConfigError(f"attack.clients {a.clients!r} names ids outside [0, {num_clients}) (partition.num_clients)")
    if len(ids) >= num_clients:
        raise ConfigError(f"attack.clients {a.clients!r} makes every client malicious; leave at least one honest")
    if a.name != "none" and not ids and int(round(a.fraction * num_clients, 6)) == 0:
        raise ConfigError(
            f"attack.name={a.name!r} but no client is malicious: attack.fraction={a.fraction} of "
            f"{num_clients} clients rounds down to 0; raise attack.fraction or list attack.clients"
        )
    if a.scale <= 0 or a.sigma <= 0 or a.z < 0:
        raise ConfigError(f"attack.scale and attack.sigma must be > 0, attack.z >= 0; got {a.scale}, {a.sigma}, {a.z}")
    if d.name not in ("none", "detect"):
        raise ConfigError(f"defense.name must be 'none' or 'detect', got {d.name!r}")
    if d.threshold <= 0:
        raise ConfigError(f"defense.threshold must be > 0 (a robust z-score), got {d.threshold}")
    _in_range("defense.reputation_weight", d.reputation_weight, 0.0, 1.0)
    _in_range("defense.quarantine_below", d.quarantine_below, 0.0, 1.0, low_open=False, high_open=True)
    if d.release_after < 0:
        raise ConfigError(f"defense.release_after must be >= 0 (0 = never release), got {d.release_after}")


def _validate_secagg(sa: SecAggConfig, num_clients: int) -> None:
    """Ranges of the secure-aggregation settings; the layout itself is checked when it is built."""
    if sa.method not in SECAGG_METHODS:
        raise ConfigError(f"secagg.method must be one of {list(SECAGG_METHODS)}, got {sa.method!r}")
    if sa.method == "paillier":
        _validate_paillier(sa)
    elif sa.method == "secaggplus":
        _validate_secaggplus(sa, num_clients)


SECAGG_METHODS = ("none", "paillier", "secaggplus")
SECAGGPLUS_MODULUS = 2**32  # Flower's modulus_range: masks and sums live modulo this


def _validate_paillier(sa: SecAggConfig) -> None:
    if not sa.key_dir:
        raise ConfigError("secagg.key_dir is empty: make keys with `python -m fedapp.keys generate --dir DIR`")
    if sa.key_bits < 256 or sa.key_bits % 8:
        raise ConfigError(f"secagg.key_bits must be a multiple of 8 and >= 256 (2048 for real use), got {sa.key_bits}")
    _in_range("secagg.bits", sa.bits, 2, 32, low_open=False, high_open=False)
    if sa.bound <= 0 or sa.clip_norm < 0 or sa.noise_sigma_total < 0:
        raise ConfigError(
            f"secagg.bound must be > 0, clip_norm and noise_sigma_total >= 0; got {sa.bound}, {sa.clip_norm}, "
            f"{sa.noise_sigma_total}"
        )
    for key in ("max_weight", "decryptors", "min_contributors"):
        _positive_int(f"secagg.{key}", getattr(sa, key))


def _validate_distributed_dp(sa: SecAggConfig, pv: PrivacyConfig) -> None:
    """Distributed DP (``secagg.noise_sigma_total`` > 0) only where its accounting holds."""
    if sa.noise_sigma_total < 0:
        raise ConfigError(f"secagg.noise_sigma_total must be >= 0 (0 = no distributed DP), got {sa.noise_sigma_total}")
    _in_range("secagg.noise_delta", sa.noise_delta, 0.0, 1.0, high_open=True)
    if sa.noise_sigma_total == 0:
        return
    if sa.method != "paillier":
        raise ConfigError(
            f"secagg.noise_sigma_total={sa.noise_sigma_total} (distributed DP) needs secagg.method='paillier', got "
            f"{sa.method!r}: only the Paillier clients add a noise share before encrypting"
            + ("; without secure aggregation use privacy=central" if sa.method == "none" else "")
        )
    if sa.clip_norm <= 0:
        raise ConfigError(
            f"secagg.noise_sigma_total > 0 needs secagg.clip_norm > 0, got {sa.clip_norm}: the noise is meaningful "
            "only against a sensitivity bound, and without an L2 clip one client can move the sum arbitrarily far"
        )
    if sa.max_weight != 1:
        raise ConfigError(
            f"secagg.noise_sigma_total > 0 needs secagg.max_weight=1, got {sa.max_weight}: an integer weight w "
            "multiplies a client's clipped update (and its noise share) by w, so one client could move the sum "
            "by w x clip_norm and the accounted sensitivity would be wrong"
        )
    if pv.central.enabled:
        raise ConfigError(
            "secagg.noise_sigma_total (distributed DP) and privacy.central.enabled do not combine: central DP "
            "clips each client's update on the server, which under secure aggregation sees only the encrypted "
            "sum; distributed DP is its secure-aggregation counterpart (each client adds a noise share, the "
            "decrypted sum carries the central noise), so turn privacy.central off"
        )


CLIENT_DP_MODES = ("local", "distributed")


def _validate_shared_noise_dp(dp: ClientDPConfig, sa: SecAggConfig, client: ClientConfig) -> None:
    """Record-level DP-FedSGD (``privacy.client.mode=distributed``) only where its accounting holds."""
    if dp.mode not in CLIENT_DP_MODES:
        raise ConfigError(f"privacy.client.mode must be one of {list(CLIENT_DP_MODES)}, got {dp.mode!r}")
    if not dp.enabled or dp.mode == "local":
        return
    why = "privacy.client.mode='distributed' "
    if sa.method not in SHARED_NOISE_SECAGG:
        raise ConfigError(
            why + f"needs secagg.method='paillier' or 'secaggplus', got {sa.method!r}: each client adds only a "
            "share of the noise, which protects its records only if nobody sees its update outside a secure sum"
        )
    if sa.min_contributors < 2:
        raise ConfigError(
            why + f"needs secagg.min_contributors >= 2, got {sa.min_contributors}: the noise is counted over "
            "min_contributors - 1 shares (so that even a decryptor, who knows its own share, faces sigma)"
        )
    if sa.noise_sigma_total > 0 or sa.clip_norm > 0:
        raise ConfigError(
            why + "adds its own noise shares and bounds each record by per-sample clipping; set "
            f"secagg.noise_sigma_total=0 and secagg.clip_norm=0 (got {sa.noise_sigma_total}, {sa.clip_norm}): "
            "user-level noise or a clip of the whole update on top would change the sum's sensitivity analysis"
        )
    if sa.method == "paillier" and sa.max_weight != 1:
        raise ConfigError(
            why + f"needs secagg.max_weight=1, got {sa.max_weight}: a weight w would multiply one client's records "
            "(and its noise share) by w"
        )
    if client.optimizer != "sgd" or client.momentum != 0 or client.weight_decay != 0 or client.local_epochs != 1:
        raise ConfigError(
            why + "takes exactly one plain SGD step per round, so that the decrypted mean is one noisy gradient "
            "step on the union of the data; set client.optimizer=sgd, client.momentum=0, client.weight_decay=0 "
            f"and client.local_epochs=1 (got {client.optimizer!r}, {client.momentum}, {client.weight_decay}, "
            f"{client.local_epochs}); use strategy.server_momentum for momentum"
        )
    _in_range("privacy.client.sample_rate", dp.sample_rate, 0.0, 1.0)


SHARED_NOISE_SECAGG = ("paillier", "secaggplus")  # the secure sums DP-FedSGD's noise shares may rely on


def _validate_shared_noise_secaggplus(cfg: ExperimentConfig) -> None:
    """Record-level DP-FedSGD under SecAgg+: every unmasked sum holds >= min_contributors unit-weight updates.

    Paillier's decryptors count the contributors of a sum themselves; under
    SecAgg+ the server unmasks whatever survived, so these settings must make
    every sum Flower's protocol can unmask hold at least ``min_contributors``
    noise shares (the reasons, and what remains trusted, are in
    :mod:`fedapp.dp_fedsgd`). The clients check the same numbers again in each
    round's setup, with the weight ratio (:func:`fedapp.dp_fedsgd.secaggplus_refusal`).
    """
    dp, sa, s = cfg.privacy.client, cfg.secagg, cfg.strategy
    if not (dp.enabled and dp.mode == "distributed" and sa.method == "secaggplus"):
        return
    why = "privacy.client.mode='distributed' under secagg.method='secaggplus' "
    # No rule for secagg.max_num_examples: under client DP the server hands SecAgg+ max_weight = the release
    # surface's constant count 1 (server_app.secaggplus_workflow), and each client checks it in the setup.
    per_round = max(int(cfg.partition.num_clients * s.fraction_fit), s.min_fit_clients)
    if per_round < sa.min_contributors:
        raise ConfigError(
            why + f"samples {per_round} clients a round (strategy.fraction_fit x partition.num_clients, at least "
            f"strategy.min_fit_clients) but secagg.min_contributors={sa.min_contributors}: every client would refuse "
            "every round, since a sum of fewer updates carries less than sigma"
        )
    _, threshold = secaggplus_shares_and_threshold(sa.num_shares, sa.reconstruction_threshold, per_round)
    if threshold < sa.min_contributors:
        raise ConfigError(
            why + f"needs a SecAgg+ reconstruction threshold >= secagg.min_contributors={sa.min_contributors}, but "
            f"secagg.reconstruction_threshold={sa.reconstruction_threshold:g} gives {threshold} of {per_round} "
            "clients: the server unmasks the sum of whoever survives (>= threshold), so clients dropping out "
            "after the setup would leave fewer noise shares in the sum than the ledger counts; raise it "
            f"(1.0 = every share) or lower min_contributors"
        )
    if dp.noise_multiplier > 0 and dp.epsilon_budget > 0:
        raise ConfigError(
            why + f"does not take privacy.client.epsilon_budget={dp.epsilon_budget:g} with a given noise_multiplier: "
            "a budget reached mid-run makes a client decline while others still train, and under SecAgg+ a "
            "decliner still counts as a survivor (weight 0, no noise share), so the sum could carry fewer than "
            "min_contributors shares; give privacy.client.target_epsilon instead (sigma is then calibrated so "
            "that no client reaches its budget within num_rounds)"
        )


def secaggplus_shares_and_threshold(
    num_shares: float, reconstruction_threshold: float, sampled: int
) -> tuple[int, int]:
    """The share count and reconstruction threshold Flower's ``SecAggPlusWorkflow`` sets for ``sampled`` clients.

    Our settings are fractions when <= 1 and counts above (as
    :func:`fedapp.server_app.secaggplus_workflow` hands them to Flower); the
    rounding mirrors Flower 1.41's ``setup_stage``.
    """
    if num_shares <= 1:
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    else:
        shares = int(num_shares)
    if reconstruction_threshold <= 1:
        return shares, max(round(reconstruction_threshold * shares), 2)
    return shares, int(reconstruction_threshold)


def _validate_secaggplus(sa: SecAggConfig, num_clients: int) -> None:
    """Flower's SecAgg+ parameter rules, checked here so a bad value fails before Ray starts."""
    if sa.num_shares <= 0 or (sa.num_shares > 1 and (sa.num_shares != int(sa.num_shares) or sa.num_shares < 3)):
        raise ConfigError(
            "secagg.num_shares must be a fraction in (0, 1] of the round's clients or a whole count >= 3, "
            f"got {sa.num_shares}"
        )
    t = sa.reconstruction_threshold
    if t <= 0 or (t > 1 and t != int(t)):
        raise ConfigError(f"secagg.reconstruction_threshold must be a fraction in (0, 1] or a whole count, got {t}")
    if t > 1 and sa.num_shares > 1 and t >= sa.num_shares:
        raise ConfigError(
            f"secagg.reconstruction_threshold={t:g} must be below secagg.num_shares={sa.num_shares:g}: "
            "otherwise no share holder may drop out"
        )
    if sa.clipping_range <= 0:
        raise ConfigError(f"secagg.clipping_range must be > 0, got {sa.clipping_range}")
    if sa.quantization_range < 2 or sa.quantization_range * num_clients >= SECAGGPLUS_MODULUS:
        raise ConfigError(
            f"secagg.quantization_range must be >= 2 and partition.num_clients x quantization_range below "
            f"2**32 (the masking modulus; the sum would wrap), got {sa.quantization_range} x {num_clients}"
        )
    _positive_int("secagg.max_num_examples", sa.max_num_examples)
    if sa.timeout_s < 0:
        raise ConfigError(f"secagg.timeout_s must be >= 0 (0 = wait for every reply), got {sa.timeout_s}")


def _validate_privacy(pv: PrivacyConfig) -> None:
    """Ranges of the DP settings; sigma = 0 or no clipping while DP is on is an error."""
    c, z = pv.client, pv.central
    for key in ("noise_multiplier", "target_epsilon", "epsilon_budget"):
        if getattr(c, key) < 0:
            raise ConfigError(f"privacy.client.{key} must be >= 0, got {getattr(c, key)}")
    _in_range("privacy.client.delta", c.delta, 0.0, 1.0, high_open=True)
    _in_range("privacy.central.delta", z.delta, 0.0, 1.0, high_open=True)
    if z.noise_multiplier < 0:
        raise ConfigError(f"privacy.central.noise_multiplier must be >= 0, got {z.noise_multiplier}")
    if c.enabled:
        if c.max_grad_norm <= 0:
            raise ConfigError(
                f"privacy.client.max_grad_norm must be > 0 while client DP is on (per-sample "
                f"clipping bounds each record's influence), got {c.max_grad_norm}"
            )
        if c.noise_multiplier > 0 and c.target_epsilon > 0:
            raise ConfigError(
                "give either privacy.client.noise_multiplier or privacy.client.target_epsilon, not "
                f"both (got {c.noise_multiplier} and {c.target_epsilon}): a target calibrates sigma"
            )
        if c.noise_multiplier == 0 and c.target_epsilon == 0:
            raise ConfigError(
                "privacy.client.noise_multiplier is 0 while client DP is on: sigma = 0 gives no "
                "privacy; set noise_multiplier > 0 or a target_epsilon to calibrate it"
            )
        if 0 < c.epsilon_budget < c.target_epsilon:
            raise ConfigError(
                f"privacy.client.epsilon_budget={c.epsilon_budget} is below target_epsilon="
                f"{c.target_epsilon}: clients would stop before the planned rounds; lower the target"
            )
    if z.enabled:
        if z.noise_multiplier == 0:
            raise ConfigError(
                "privacy.central.noise_multiplier is 0 while central DP is on: sigma = 0 gives no privacy"
            )
        if z.clipping_norm <= 0:
            raise ConfigError(
                f"privacy.central.clipping_norm must be > 0 while central DP is on, got {z.clipping_norm}"
            )


def _positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


def _in_range(
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = True,
    high_open: bool = False,
) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value}")
