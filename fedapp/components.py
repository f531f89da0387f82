"""Turn an :class:`ExperimentConfig` into data and models; check it before a run starts.

The one place that knows how a client id maps to its slice of the data, so the
simulation, the real SuperNodes and the tests all train on the same partitions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from logging import INFO, WARNING

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fedapp.attacks import resolve_attack
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.crypto.fixedpoint import Quantizer
from fedapp.datasets import dataset_spec, labels_of, load_dataset
from fedapp.dp_fedsgd import plan_shared_noise, warn_if_secaggplus_too_coarse
from fedapp.models import build_model, check_model
from fedapp.partition import check_partition_config, partition_indices, train_val_split
from fedapp.privacy import check_dp_model, plan_client_dp, warn_if_delta_too_large
from fedapp.training import OPTIMIZERS

log = logging.getLogger("flwr").log  # Flower's logger by name, without importing Flower here


def check_experiment(cfg: ExperimentConfig, *, load_data: bool = True) -> None:
    """Every name resolves and every size fits, or a :class:`ConfigError` says why.

    With ``load_data`` the data set is opened too (a missing data root then fails
    here, before any process or Ray worker is started).
    """
    from fedapp.strategies import check_strategy_config  # strategies import Flower; keep this lazy

    cfg.validate()
    spec = dataset_spec(cfg.dataset.name)
    check_model(cfg.model.name, spec)
    if cfg.client.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown client.optimizer {cfg.client.optimizer!r}; valid: {list(OPTIMIZERS)}")
    check_partition_config(cfg.partition)
    check_strategy_config(cfg)
    from fedapp.tracking import check_tracking

    check_tracking(cfg.tracking)  # a missing optional extra fails before Ray or a SuperLink starts
    resolve_attack(cfg.attack.name)  # an unknown name or a dotted path that does not import fails here
    new_model(cfg)  # a model DP-SGD cannot train fails here, with Opacus's reasons
    if load_data and cfg.secagg.method == "paillier":  # like the data, the keys live where the run runs
        check_paillier_keys(cfg)
    if load_data:
        train, _ = load_dataset(cfg.dataset)
        check_partition_config(cfg.partition, len(train))
        if cfg.privacy.client.enabled:
            check_client_dp(cfg)


def check_paillier_keys(cfg: ExperimentConfig) -> None:
    """The key folder exists, and no DP guarantee rests on a key every client holds whole.

    With a single key pair (``python -m fedapp.keys generate``) any client that
    colludes with the server decrypts every upload, each carrying one noise
    share: refused under DP, warned about otherwise. With dealt threshold keys
    (``python -m fedapp.keys deal``), a policy that lets two disjoint groups of
    decryptors release two different sums in one round is warned about.
    """
    from fedapp.crypto.contributions import differencing_safe, read_roster
    from fedapp.crypto.dealing import is_threshold_key_dir
    from fedapp.crypto.threshold import load_threshold_params

    key_dir = Path(cfg.secagg.key_dir)
    if not (key_dir / "paillier_public.json").exists():
        raise ConfigError(
            f"secagg.key_dir={cfg.secagg.key_dir!r} holds no Paillier public key; deal the keys first: "
            f"python -m fedapp.keys deal --dir {cfg.secagg.key_dir} --clients {cfg.partition.num_clients} "
            f"--threshold 2 --min-contributors {cfg.secagg.min_contributors} --bits {cfg.secagg.key_bits}"
        )
    dp_on = cfg.privacy.client.enabled or cfg.secagg.noise_sigma_total > 0
    if not is_threshold_key_dir(key_dir):
        if dp_on:
            raise ConfigError(
                f"{cfg.secagg.key_dir} holds a single Paillier key pair that every client holds whole: one client "
                "colluding with the server would decrypt every upload (one noise share each); deal threshold "
                f"keys with python -m fedapp.keys deal --dir DIR --clients {cfg.partition.num_clients}"
            )
        log(logging.WARNING, "secagg.key_dir=%s is a single key pair: every client holds the whole private key, so "
            "the server plus any one client decrypt every upload (deal threshold keys: python -m fedapp.keys deal)",
            cfg.secagg.key_dir)
        return
    params = load_threshold_params(key_dir)
    if params.num_parties != cfg.partition.num_clients:
        raise ConfigError(
            f"the keys in {cfg.secagg.key_dir} were dealt to {params.num_parties} clients, the experiment has "
            f"partition.num_clients={cfg.partition.num_clients}"
        )
    if cfg.secagg.max_weight != 1:
        raise ConfigError(
            f"secagg.max_weight={cfg.secagg.max_weight} with threshold keys: decryptors sum the signed updates "
            "unweighted (sample counts are not released), so set secagg.max_weight=1"
        )
    enrolled = len(read_roster(key_dir))
    if not dp_on and cfg.secagg.min_contributors < enrolled:
        log(logging.WARNING, "secure aggregation without DP and min_contributors %d < %d clients: a malicious server "
            "that sends the same model to different subsets over several rounds can solve the sums for each "
            "client's (nearly repeated) update; use min_contributors = %d or add DP noise",
            cfg.secagg.min_contributors, enrolled, enrolled)
    if not differencing_safe(threshold=params.threshold, num_parties=params.num_parties,
                             min_contributors=cfg.secagg.min_contributors, enrolled=enrolled):
        log(logging.WARNING, "threshold %d of %d with min_contributors %d < %d clients: two disjoint groups of "
            "decryptors could each release a different sum in one round, whose difference is one update; use "
            "--threshold > %d or --min-contributors %d", params.threshold, params.num_parties,
            cfg.secagg.min_contributors, enrolled, params.num_parties // 2, enrolled)


def check_client_dp(cfg: ExperimentConfig) -> None:
    """Calibrate every client's DP-SGD plan now, so an unreachable target stops the run early.

    The delta warning is given once, for the smallest client (the one it concerns most).
    """
    sizes = sorted({len(client_data(cfg, pid)[0]) for pid in range(cfg.partition.num_clients)})
    if cfg.privacy.client.mode == "distributed":
        check_shared_noise_dp(cfg, sizes)
        return
    for size in sizes:
        plan_client_dp(
            cfg.privacy.client,
            num_samples=size,
            batch_size=cfg.client.batch_size,
            local_epochs=cfg.client.local_epochs,
            num_rounds=cfg.num_rounds,
            warn=size == sizes[0],
        )


def check_shared_noise_dp(cfg: ExperimentConfig, sizes: list[int]) -> None:
    """Record-level DP-FedSGD: calibrate once, and warn where the numbers make it weaker than it looks.

    The same plan holds for every client (it depends on the configuration only);
    ``sizes`` are the clients' training-set sizes, smallest first.
    """
    dp, sa = cfg.privacy.client, cfg.secagg
    plan = plan_shared_noise(
        dp, min_contributors=sa.min_contributors, num_rounds=cfg.num_rounds, batch_size=cfg.client.batch_size
    )
    warn_if_delta_too_large(dp.delta, sizes[0])  # the smallest client, whom it concerns most
    expected = [dp.sample_rate * n for n in (sizes[0], sizes[-1])]
    if not all(0.75 * cfg.client.batch_size <= e <= 1.25 * cfg.client.batch_size for e in expected):
        log(WARNING, "client.batch_size=%d divides every client's noisy gradient sum, but sample_rate x client size "
            "gives expected batches of %.0f-%.0f: the step is scaled off by that ratio (privacy is unaffected)",
            cfg.client.batch_size, *expected)
    if sa.method == "secaggplus":  # Flower's quantisation of the parameters instead of Paillier's fixed point
        last_lr = cfg.client.lr * cfg.client.lr_decay ** (cfg.num_rounds - 1)
        largest = max(float(p.detach().abs().max()) for p in new_model(cfg).parameters())
        warn_if_secaggplus_too_coarse(plan, lr=last_lr, clipping_range=sa.clipping_range,
                                      quantization_range=sa.quantization_range, max_abs_parameter=largest)
    share_std = cfg.client.lr * plan.share_multiplier * plan.max_grad_norm / plan.normaliser
    step = Quantizer(bound=sa.bound, bits=sa.bits).step
    if sa.method == "paillier" and (step > share_std / 10 or sa.bound < 6 * share_std):
        log(WARNING, "a client's noise share in its update has std %.3g (lr x share x C / B) but secagg's fixed point "
            "has step %.3g and bound %.3g: keep step < std/10 and bound > 6 std (raise secagg.bits / bound), "
            "since rounding and clamping each share is not covered by the Gaussian accounting",
            share_std, step, sa.bound)
    log(INFO, "record-level DP-FedSGD: sigma %.4f over %d shares (each %.4f), q %.4g, %d rounds, target epsilon %g "
        "at delta %g", plan.noise_multiplier, plan.shares_counted, plan.share_multiplier, plan.sample_rate,
        cfg.num_rounds, dp.target_epsilon, dp.delta)


def new_model(cfg: ExperimentConfig) -> nn.Module:
    """The experiment's model, initialised from ``cfg.seed`` (same on every process).

    With client DP on, Opacus must accept it (or fix it, when allowed); server and
    clients call this same function, so their weights keep the same shapes.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, dataset_spec(cfg.dataset.name))
    if cfg.privacy.client.enabled:
        model = check_dp_model(model, fix=cfg.privacy.client.fix_model)
    return model


def client_data(cfg: ExperimentConfig, partition_id: int) -> tuple[Subset, Subset]:
    """Client ``partition_id``'s local train and validation sets."""
    if not 0 <= partition_id < cfg.partition.num_clients:
        raise ConfigError(
            f"partition-id {partition_id} is outside [0, {cfg.partition.num_clients}) "
            "(partition.num_clients)"
        )
    train, _ = load_dataset(cfg.dataset)
    parts = _partitions(cfg)
    local_train, local_val = train_val_split(parts[partition_id], cfg.dataset.val_fraction, seed=cfg.seed + partition_id)
    return Subset(train, local_train.tolist()), Subset(train, local_val.tolist())


def test_data(cfg: ExperimentConfig) -> TensorDataset:
    """The held-out test set the server evaluates on."""
    return load_dataset(cfg.dataset)[1]


_PARTITION_CACHE: dict[tuple[str, str], list] = {}


def _partitions(cfg: ExperimentConfig) -> list:
    """Index arrays of all clients, computed once per process and configuration."""
    key = (repr(cfg.dataset), repr(cfg.partition))
    if key not in _PARTITION_CACHE:
        train, _ = load_dataset(cfg.dataset)
        _PARTITION_CACHE[key] = partition_indices(labels_of(train), cfg.partition)
    return _PARTITION_CACHE[key]
