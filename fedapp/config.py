"""Typed experiment configuration: what can be configured, with its defaults.

Every entry point (Hydra runner, ``flwr run``, the process launcher, tests) turns
its own configuration source into one :class:`ExperimentConfig` through
:func:`ExperimentConfig.from_dict`, so a mistake is reported the same way
everywhere and before any data is loaded or any process is started.

This module imports nothing of fedapp: the range and combination rules live in
:mod:`fedapp.config_checks` (called by :meth:`ExperimentConfig.validate`);
registries of names (datasets, models, strategies, ...) live beside their
implementations and are checked by :func:`fedapp.components.check_experiment`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is impossible; the message names key and allowed range."""


@dataclass
class DatasetConfig:
    """Which data set and where it lives.

    ``root`` empty means: ``$FEDAPP_DATA_ROOT`` if set, else ``./data``.
    ``max_train_samples`` > 0 takes a seeded subset (quick experiments, tests).
    """

    name: str = "mnist"
    root: str = ""
    download: bool = True
    val_fraction: float = 0.1
    max_train_samples: int = 0
    max_test_samples: int = 0
    synthetic_train_size: int = 4000
    synthetic_test_size: int = 1000


@dataclass
class PartitionConfig:
    """How the training set is split over clients (one partition per client)."""

    name: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5
    shards_per_client: int = 2
    min_partition_size: int = 10
    seed: int = 42


@dataclass
class ModelConfig:
    """Which network every client trains."""

    name: str = "cnn_mnist"


@dataclass
class ClientConfig:
    """Local training on each client.

    ``lr_decay`` multiplies the learning rate once per round (round r trains at
    ``lr * lr_decay**(r-1)``): under DP-SGD the noise floor, not the step count,
    limits late rounds, and smaller steps average more noise away.
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 1.0


@dataclass
class StrategyConfig:
    """Server-side aggregation rule and client sampling.

    ``num_malicious`` is the number of Byzantine clients the robust rules assume;
    ``num_clients_to_keep`` is Multi-Krum's m; ``beta`` is the trimmed-mean cut per side;
    ``server_lr`` / ``server_momentum`` are FedAvgM's (Hsu et al. 2019).

    Faults (:mod:`fedapp.rounds`): ``round_timeout_s`` is the deadline of a fit
    round (0 = wait for every reply); replies after it are dropped and counted.
    A round with fewer successful updates than ``min_fit_clients`` is a failed
    round; more than ``max_failed_rounds`` of them fail the run. When fewer than
    ``min_available_clients`` nodes are connected, the server waits up to
    ``node_wait_s`` seconds for nodes to (re)connect, then fails the run.
    """

    name: str = "fedavg"
    fraction_fit: float = 1.0
    fraction_evaluate: float = 0.0
    min_fit_clients: int = 2
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    num_malicious: int = 0
    num_clients_to_keep: int = 0
    beta: float = 0.2
    server_lr: float = 1.0
    server_momentum: float = 0.0
    round_timeout_s: float = 0.0
    max_failed_rounds: int = 0
    node_wait_s: float = 300.0


@dataclass
class RuntimeConfig:
    """Where and how the experiment executes.

    ``mode`` is ``simulation`` (Flower's simulation engine on Ray) or ``processes``
    (one ``flower-superlink`` and ``num_clients`` ``flower-supernode`` processes).
    ``ray_address`` empty starts a local Ray; ``auto`` or ``ray://host:port`` joins a cluster.
    ``eval_every`` evaluates the global model on the test set every that many
    rounds (and always after the last): long runs of cheap rounds (DP-FedSGD)
    would otherwise spend much of their time evaluating.
    """

    mode: str = "simulation"
    output_dir: str = "outputs/latest"
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_address: str = ""
    eval_batch_size: int = 1000
    eval_every: int = 1
    device: str = "cpu"
    superlink_port: int = 9092
    tls: bool = False
    timeout_s: int = 1800


@dataclass
class ClientDPConfig:
    """DP-SGD on every client (Opacus), accounted over the whole run.

    Give either ``noise_multiplier`` (sigma) directly or a whole-run
    ``target_epsilon``; with a target, sigma is calibrated once so that
    ``num_rounds x local_epochs`` epochs of Poisson-sampled DP-SGD spend at most
    ``(target_epsilon, delta)``. ``epsilon_budget`` (0 = ``target_epsilon``, or no
    cap when sigma is given) is where a client stops: it declines a round that
    would take it past the budget. ``ledger_dir`` (empty = off) mirrors each
    client's ledger to disk so the spent budget survives a SuperNode restart.
    ``fix_model`` lets Opacus replace layers it cannot handle (BatchNorm ->
    GroupNorm) instead of rejecting the model.

    ``mode`` is ``local`` (the above: every client adds all the noise its
    epsilon needs) or ``distributed`` (record-level DP-FedSGD under Paillier
    or SecAgg+ secure aggregation, :mod:`fedapp.dp_fedsgd`): each round a
    client takes one DP-SGD step on a Poisson sample at ``sample_rate`` and
    adds only a share of the noise, so that ``secagg.min_contributors - 1``
    shares carry sigma; its ledger books one step at ``(sigma, sample_rate)``
    per round. Under SecAgg+ it also needs ``secagg.reconstruction_threshold``
    to give at least ``min_contributors`` (every unmasked sum holds that many).
    """

    enabled: bool = False
    mode: str = "local"
    sample_rate: float = 0.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    epsilon_budget: float = 0.0
    ledger_dir: str = ""
    fix_model: bool = False


@dataclass
class CentralDPConfig:
    """User-level central DP: the server clips each update and noises the aggregate.

    Flower's ``DifferentialPrivacyServerSideFixedClipping`` around FedAvg; the
    noise on the mean of ``m`` clipped updates has standard deviation
    ``noise_multiplier * clipping_norm / m``. Accounted per round with client
    sampling (q = clients per round / clients) at ``delta``.
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5


@dataclass
class PrivacyConfig:
    """Differential privacy: record-level on clients, user-level on the server (or both)."""

    client: ClientDPConfig = field(default_factory=ClientDPConfig)
    central: CentralDPConfig = field(default_factory=CentralDPConfig)


@dataclass
class SecAggConfig:
    """Secure aggregation: ``method`` is ``none``, ``paillier`` (FedAvg only) or ``secaggplus``.

    Paillier: clients share a key pair made by ``python -m fedapp.keys generate``;
    ``key_dir`` holds the public key on the server and both keys on the clients.
    Each client clips its update (L2 ``clip_norm``, 0 = off; then every
    coordinate to ``[-bound, bound]``), quantises it to ``bits`` bits and packs
    it; ``max_weight`` > 1 folds sample counts in as weights 1..max_weight (more
    headroom, more bytes). ``decryptors`` clients decrypt the sum and must
    agree; a decryptor refuses sums of fewer than ``min_contributors`` clients.
    ``noise_sigma_total`` > 0 adds distributed DP noise: each of the
    ``n = partition.num_clients`` clients adds ``N(0, sigma^2 / n)`` so a sum of
    all ``n`` carries ``sigma`` (in update units; ``k`` contributors carry
    ``sigma * sqrt(k / n)``); it needs ``clip_norm`` > 0 (the sensitivity) and
    ``max_weight`` = 1, and is accounted as user-level DP at ``noise_delta``
    (:class:`fedapp.dp_strategy.DistributedDPAccounting`). ``pool_dir`` (empty =
    off) lets each client precompute the next round's obfuscators in the
    background after it replied, kept there (mode 0600: as secret as the key).

    SecAgg+ (Flower's ``secaggplus_mod`` + ``SecAggPlusWorkflow``; no shared
    key): each client's mask seeds are Shamir-shared with ``num_shares``
    neighbours (<= 1: that fraction of the round's clients; > 1: a count),
    ``reconstruction_threshold`` of them (<= 1: fraction of ``num_shares``)
    are needed to unmask, so up to ``num_shares - threshold`` neighbours may
    drop out. Parameters (not updates) are clipped to ``[-clipping_range,
    clipping_range]`` and quantised to ``quantization_range`` levels; each is
    weighted by ``num_examples / max_num_examples`` (Flower's ``max_weight``:
    keep it >= the largest client's sample count; where the release surface
    sends a constant count instead -- any secure aggregation, any client DP --
    the server uses that constant, 1, and this setting is unused).
    Since parameters, not updates, are clipped, ``clipping_range`` must cover
    the model's largest parameter (plus, under DP, a few noise-share
    deviations). ``timeout_s`` > 0 treats replies later than that as dropouts
    (0 = wait for all). ``min_contributors`` is DP-FedSGD's ``m`` under SecAgg+
    too: every client refuses a round set up for fewer clients, or with a
    reconstruction threshold below it.
    """

    method: str = "none"
    key_dir: str = ""
    key_bits: int = 2048
    bits: int = 16
    bound: float = 1.0
    clip_norm: float = 0.0
    stochastic: bool = False
    max_weight: int = 1
    decryptors: int = 2
    min_contributors: int = 2
    noise_sigma_total: float = 0.0
    noise_delta: float = 1e-5
    pool_dir: str = ""
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.7
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    max_num_examples: int = 10000
    timeout_s: float = 0.0


@dataclass
class AttackConfig:
    """Simulated Byzantine clients (:mod:`fedapp.attacks`); the attack runs on those clients.

    ``name`` is ``none``, a registered attack (``signflip``, ``gaussian``,
    ``labelflip``, ``scaling``, ``alie``) or a dotted path ``pkg.mod:attr`` to
    your own. Malicious clients: ``clients`` (partition ids separated by commas
    or spaces, e.g. ``"0,3"``; a string because Flower's run config holds no
    lists) or else ``floor(fraction x partition.num_clients)`` ids drawn with
    ``seed``. ``scale``: the scaling attack's boost; ``sigma``: the Gaussian
    attack's noise std; ``z``: ALIE's z (0 = the paper's z_max for n and m).
    """

    name: str = "none"
    fraction: float = 0.0
    clients: str = ""
    seed: int = 0
    scale: float = 10.0
    sigma: float = 1.0
    z: float = 0.0

    def client_ids(self) -> tuple[int, ...]:
        """``clients`` parsed; a :class:`ConfigError` names anything that is not an id."""
        tokens = self.clients.replace(",", " ").split()
        try:
            ids = tuple(int(t) for t in tokens)
        except ValueError:
            raise ConfigError(
                f"attack.clients must be partition ids separated by commas, e.g. '0,3', got {self.clients!r}"
            ) from None
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ConfigError(f"attack.clients must be distinct ids >= 0, got {self.clients!r}")
        return ids


@dataclass
class DefenseConfig:
    """Server-side anomaly detection, reputation and quarantine (:mod:`fedapp.robustness`).

    ``name`` is ``none`` or ``detect``. A client is flagged in a round when one
    of its robust z-scores (update norm, cosine to the median update, Krum
    score) passes ``threshold``; its reputation is an exponential moving average
    (weight ``reputation_weight`` on the newest round) of 1 = clean, 0 =
    flagged, starting at 1; below ``quarantine_below`` it is quarantined (not
    sampled) and released on probation after ``release_after`` rounds (0 =
    never). ``drop_flagged`` leaves flagged updates out of that round's aggregate.
    """

    name: str = "none"
    threshold: float = 3.0
    reputation_weight: float = 0.5
    quarantine_below: float = 0.4
    release_after: int = 5
    drop_flagged: bool = True


@dataclass
class StoreConfig:
    """Where a run is recorded, checkpointed and audited (:mod:`fedapp.store`).

    ``url`` is any SQLAlchemy URL; empty means ``$FEDAPP_STORE_URL`` or else an
    SQLite file ``outputs/fedapp.db`` (resolved to an absolute path before the
    run starts, so a SuperLink's ServerApp writes to the same file).
    ``checkpoint_every`` rounds (and after the last round) the global model and
    the strategy's state are written atomically; ``keep_checkpoints`` newest are
    kept. ``resume`` names a run to continue from its last checkpoint.
    ``best_effort`` lets a sweep go on when the database is unavailable
    (otherwise the run fails rather than train without a record).
    ``audit_key`` is the operator's Ed25519 key (``fedapp keys audit``) that signs
    the audit chain's head; without one the chain is kept but not signed.
    """

    enabled: bool = True
    url: str = ""
    run_id: str = ""
    resume: str = ""
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    best_effort: bool = False
    audit_key: str = ""
    retries: int = 5


@dataclass
class ValidationConfig:
    """Checks every plain update passes before aggregation (:mod:`fedapp.validation`).

    Shapes, dtype, finiteness and counts are always checked. The norm checks need
    no knowledge of any attack: ``max_update_norm`` bounds the L2 norm of
    ``update - global model`` absolutely (0 = off), and ``relative_norm_bound``
    bounds it at that many times the round's median update norm (lower median,
    so that one of two clients cannot drag the reference up; 0 = off).
    ``replay_check`` refuses an update identical to one the same client sent
    before. ``max_num_examples`` caps the sample count a client claims: FedAvg
    weighs by it, so an unbounded claim would let one client replace the mean. Where secure aggregation hides single updates the server cannot
    check them; there the clients' own clip applies.
    """

    max_update_norm: float = 1000.0
    relative_norm_bound: float = 10.0
    replay_check: bool = True
    max_num_examples: int = 100000


@dataclass
class FaultsConfig:
    """Faults injected on purpose (:mod:`fedapp.faults`), to see what a run does with them.

    ``kind``: ``none``, ``crash`` (the client raises), ``exit`` (the ClientApp
    process exits), ``hang`` (never replies before the deadline), ``straggler``
    (trains ``slowdown`` times slower), ``drop`` (trains, then the connection
    drops before the reply), ``malformed`` (a broken update: ``malformation`` is
    ``nan``, ``inf``, ``shape``, ``count``, ``dtype`` or ``norm``) or ``replay``
    (sends its previous round's update again). Affected clients: ``clients``
    (partition ids, e.g. ``"0,3"``) in every listed round, or else each client
    with probability ``fraction`` per round, drawn with ``seed``; ``rounds``
    limits the rounds (e.g. ``"2,3"``; empty: all). ``node_schedule`` (processes
    mode) kills and restarts SuperNodes, e.g. ``"kill 1 @2, restart 1 @5"``:
    partition 1's node is killed when round 2 starts and restarted when round 5 starts.
    """

    kind: str = "none"
    fraction: float = 0.0
    clients: str = ""
    rounds: str = ""
    seed: int = 0
    malformation: str = "nan"
    slowdown: float = 10.0
    hang_s: float = 600.0
    node_schedule: str = ""


@dataclass
class TrackingConfig:
    """Experiment tracking beside the run's own files (:mod:`fedapp.tracking`).

    ``tensorboard`` writes every round row's numbers as TensorBoard scalars to
    ``<runtime.output_dir>/tensorboard/``, flushed after each round, so
    ``tensorboard --logdir outputs`` follows live runs and compares finished
    ones. Off by default: it needs the optional extra ``fedapp[tracking]``,
    and the run's own ``metrics.csv`` and store already hold the same numbers.
    """

    tensorboard: bool = False


@dataclass
class ExperimentConfig:
    """One federated experiment, as every fedapp component receives it."""

    name: str = "default"
    num_rounds: int = 5
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ExperimentConfig":
        """Build and validate from a nested mapping (Hydra, TOML, JSON).

        Unknown keys are an error, so a typo is never silently ignored.
        """
        cfg = _build(cls, raw, path="")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Nested plain-python form; round-trips through :meth:`from_dict`."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check ranges and cross-field consistency; raise :class:`ConfigError` (rules: :mod:`fedapp.config_checks`)."""
        from fedapp.config_checks import validate_experiment  # the checks import these classes

        validate_experiment(self)


def _build(cls: type, raw: Mapping[str, Any], path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = path or "the top level"
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in raw.items():
        key = f"{path}.{name}" if path else name
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = _build(type(current), value, key)
        else:
            kwargs[name] = _coerce(key, value, current)
    return cls(**kwargs)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept the value when it has the default's type (ints for floats are widened)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if value is None:
            return ""
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be of type {type(default).__name__}, got {value!r}")
