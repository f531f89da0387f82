"""Flower ClientApp: a NumPyClient that trains on its partition of the data.

Nothing that must survive between rounds is kept on the client object: in a
deployment each message starts the ClientApp in a new process, so per-client
state belongs in ``context.state`` (Flower keeps it on the SuperNode).

Secure aggregation on the client: Paillier is done inside :class:`FedappClient`
(encrypt the update; decrypt the sum when asked); SecAgg+ is Flower's
``secaggplus_mod`` around the whole client (see :func:`secagg_mod`), so it
masks exactly what ``fit`` returns -- after local DP-SGD and after any
simulated attack, as a real client's reply would be.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ConfigRecord, Context, Message, NDArrays, RecordDict, Scalar, log
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fedapp.attacks import Attack, AttackContext, attack_rng, malicious_clients, poison_weights, resolve_attack
from fedapp.components import client_data, new_model
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.crypto import PrivateKey, load_private_key
from fedapp.crypto.contributions import ContributionGate, DecryptionMemory, sign_contribution
from fedapp.crypto.dealing import Party, is_threshold_key_dir, load_party, load_party_state, save_party_state
from fedapp.crypto.pool_files import pool_path, refill_in_background, take_obfuscators
from fedapp.crypto.protocol import (
    MODE_DECRYPT,
    MODE_ENCRYPT,
    SECAGG_KEY_ID,
    SECAGG_MODE,
    SECAGG_ROUND,
    SECAGG_SHARE_INDEX,
    SECAGG_TOTAL_WEIGHT,
    SecAggSettings,
    decrypt_request,
    encrypt_update,
    settings_for,
    threshold_partial_decrypt,
)
from fedapp.datasets import dataset_spec
from fedapp.faults.mod import make_faults_mod
from fedapp.rounds.outcomes import ClientError
from fedapp.dp_fedsgd import SharedNoisePlan, noisy_gradient_step, plan_shared_noise
from fedapp.node_policy import pin_to_node
from fedapp.release import make_release_mod
from fedapp.privacy import DPPlan, PrivacyLedger, make_private, more_spent, plan_client_dp
from fedapp.runconfig import experiment_from_run_config
from fedapp.training import evaluate, get_weights, make_optimizer, round_lr, set_weights, train_epochs
from fedapp.wrappers import CLIENT_ID_KEY, DECLINED_KEY, EPSILON_KEY, REASON_CODE_KEY, REASON_KEY

NextHandler = Callable[[Message, Context], Message]  # what a client mod calls to go on
LEDGER_STATE_KEY = "fedapp.privacy.ledger"  # where a client's DP ledger lives in context.state


class FedappClient(NumPyClient):
    """Local SGD (or DP-SGD) on one partition; reports its partition id with every reply.

    ``state`` is the node's ``context.state``: with client DP on, the privacy
    ledger is read from and written back to it every round. When this partition
    is one of the run's simulated attackers (:mod:`fedapp.attacks`), it poisons
    its labels and/or its update here, on the client; its replies look like any
    other client's.
    """

    def __init__(
        self, cfg: ExperimentConfig, partition_id: int, state: RecordDict | None = None, run_id: int = 0
    ) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.state = state if state is not None else RecordDict()
        self.run_id = run_id  # signed into every Paillier contribution: a signature is valid for one run only
        self.model = new_model(cfg)
        self.train_set, self.val_set = client_data(cfg, partition_id)
        self.colluders = malicious_clients(cfg.attack, cfg.partition.num_clients)
        self.attack = resolve_attack(cfg.attack.name) if partition_id in self.colluders else None

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if config.get(SECAGG_MODE) == MODE_DECRYPT:
            return self._decrypt_aggregate(parameters, config)
        if self.cfg.secagg.method == "paillier":
            check_encrypt_instruction(config)
        if config.get(SECAGG_MODE) == MODE_ENCRYPT and is_threshold_key_dir(self.cfg.secagg.key_dir):
            self._claim_round(int(config[SECAGG_ROUND]))  # before training: a refused round spends no budget
        ctx = None if self.attack is None else self._attack_context(parameters, int(config.get("server_round", 0)))
        new, num_examples, metrics = self._train(parameters, config, ctx)
        if ctx is not None and not metrics.get(DECLINED_KEY):  # a decline is not an update: nothing to poison
            new = poison_weights(self.attack, parameters, new, ctx)
        if config.get(SECAGG_MODE) == MODE_ENCRYPT and not metrics.get(DECLINED_KEY):
            clamped = clamped_values(parameters, new, self.cfg.secagg.bound)
            if clamped:  # data-dependent: logged here, never sent (fedapp.release)
                log(WARNING, "Client %s: %d coordinates clamped to secagg.bound=%g before encryption",
                    self.partition_id, clamped, self.cfg.secagg.bound)
            new = self._encrypt_update(parameters, new, config)
        return new, num_examples, metrics

    def _secagg(self) -> tuple[PrivateKey, SecAggSettings]:
        """The clients' key pair (``secagg.key_dir``) and the settings the server uses too."""
        private_key = load_private_key(self.cfg.secagg.key_dir)
        return private_key, settings_for(self.cfg.secagg, self.cfg.partition.num_clients)

    def _party(self) -> Party:
        """This client's key share, signing key and own decryption policy (threshold keys)."""
        party = load_party(self.cfg.secagg.key_dir, self.partition_id)
        if party.policy.min_contributors != self.cfg.secagg.min_contributors:
            raise ConfigError(
                f"the run asks for secagg.min_contributors={self.cfg.secagg.min_contributors} but client "
                f"{self.partition_id}'s own policy (dealt with its key share) says {party.policy.min_contributors}: "
                "refusing, since noise shares and decryptions are sized by the client's policy"
            )
        return party

    def _encrypt_signed(self, old: NDArrays, new: NDArrays, config: dict[str, Scalar]) -> NDArrays:
        """Threshold keys: encrypt with the public key (or the offline pool), then sign the ciphertext."""
        party = self._party()
        settings = settings_for(self.cfg.secagg, self.cfg.partition.num_clients)
        if config.get(SECAGG_KEY_ID) != party.public_key.key_id:
            raise ValueError(f"server asks for key {config.get(SECAGG_KEY_ID)}, this client holds {party.public_key.key_id}")
        needed = settings.layout.num_ciphertexts(int(sum(a.size for a in old)))
        path = pool_path(self.cfg.secagg.pool_dir, self.partition_id) if self.cfg.secagg.pool_dir else None
        pool = take_obfuscators(path, party.public_key, needed) if path is not None else None
        server_round = int(config[SECAGG_ROUND])
        [blob] = encrypt_update(
            old, new, server_round=server_round, sender=party.sender, public_key=party.public_key,
            settings=settings, pool=pool,
        )
        if path is not None and not path.exists():
            refill_in_background(path, party.public_key, needed)
        signature = sign_contribution(
            party.signing_key, run_id=self.run_id, server_round=server_round, key_id=party.public_key.key_id,
            sender=party.sender, blob=blob.tobytes(),
        )
        return [blob, signature]

    def _claim_round(self, server_round: int) -> None:
        """At most one signed contribution per round (:class:`~fedapp.crypto.contributions.ContributionGate`)."""
        remembered = load_party_state(self.cfg.secagg.key_dir, self.partition_id)
        gate = ContributionGate(remembered["signed"])
        gate.claim(run_id=self.run_id, server_round=server_round)
        save_party_state(self.cfg.secagg.key_dir, self.partition_id, {**remembered, "signed": gate.last})

    def _encrypt_update(self, old: NDArrays, new: NDArrays, config: dict[str, Scalar]) -> NDArrays:
        if is_threshold_key_dir(self.cfg.secagg.key_dir):
            return self._encrypt_signed(old, new, config)
        private_key, settings = self._secagg()
        if config.get(SECAGG_KEY_ID) != private_key.key_id:
            raise ValueError(f"server asks for key {config.get(SECAGG_KEY_ID)}, this client holds {private_key.key_id}")
        needed = settings.layout.num_ciphertexts(int(sum(a.size for a in old)))
        path = pool_path(self.cfg.secagg.pool_dir, self.partition_id) if self.cfg.secagg.pool_dir else None
        pool = take_obfuscators(path, private_key, needed) if path is not None else None
        encrypted = encrypt_update(
            old, new, server_round=int(config[SECAGG_ROUND]), sender=str(self.partition_id),
            public_key=private_key.public_key, settings=settings, private_key=private_key, pool=pool,
        )
        if path is not None and not path.exists():  # the pool ran dry (nothing was written back): refill
            refill_in_background(path, private_key, needed)
        return encrypted

    def _partial_decrypt(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Threshold decryptor step: signed updates in, checked and summed here, one partial decryption out."""
        party = self._party()
        remembered = load_party_state(self.cfg.secagg.key_dir, self.partition_id)
        memory = DecryptionMemory(remembered["decrypted"])
        partials = threshold_partial_decrypt(
            parameters, share=party.share, policy=party.policy, memory=memory, run_id=self.run_id,
            server_round=int(config[SECAGG_ROUND]),
            settings=settings_for(self.cfg.secagg, self.cfg.partition.num_clients),
        )
        save_party_state(self.cfg.secagg.key_dir, self.partition_id, {**remembered, "decrypted": memory.seen})
        return [partials], 0, {CLIENT_ID_KEY: self.partition_id, SECAGG_SHARE_INDEX: party.share.index}

    def _decrypt_aggregate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Decryptor step: the round's encrypted sum in, the plaintext sum and its weight out."""
        if is_threshold_key_dir(self.cfg.secagg.key_dir):
            return self._partial_decrypt(parameters, config)
        private_key, settings = self._secagg()
        arrays, weight = decrypt_request(
            parameters, server_round=int(config[SECAGG_ROUND]), private_key=private_key, settings=settings
        )
        return arrays, 0, {CLIENT_ID_KEY: self.partition_id, SECAGG_TOTAL_WEIGHT: weight}

    def _attack_context(self, parameters: NDArrays, server_round: int) -> AttackContext:
        """What this malicious client knows this round; colluders' updates are trained on demand."""

        def honest_update_of(pid: int) -> NDArrays:
            model = new_model(self.cfg)
            set_weights(model, parameters)
            local_sgd(self.cfg, model, client_data(self.cfg, pid)[0], server_round, pid)
            new = get_weights(model)
            return [n - o for n, o in zip(new, parameters) if np.issubdtype(o.dtype, np.floating)]

        return AttackContext(
            partition_id=self.partition_id,
            server_round=server_round,
            malicious=self.colluders,
            num_clients=self.cfg.partition.num_clients,
            num_classes=dataset_spec(self.cfg.dataset.name).num_classes,
            config=self.cfg.attack,
            rng=attack_rng(self.cfg.attack, server_round, self.partition_id),
            honest_update_of=honest_update_of,
        )

    def _train(
        self, parameters: NDArrays, config: dict[str, Scalar], ctx: AttackContext | None = None
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        server_round = int(config.get("server_round", 0))
        train_set = self.train_set if ctx is None else poisoned_labels(self.train_set, self.attack, ctx)
        if self.cfg.privacy.client.enabled and self.cfg.privacy.client.mode == "distributed":
            return self._fit_shared_noise(parameters, train_set, server_round)
        if self.cfg.privacy.client.enabled:  # sampling and noise are drawn from the OS, not from cfg.seed
            loader = DataLoader(train_set, batch_size=self.cfg.client.batch_size, shuffle=True)
            optimizer = make_optimizer(self.cfg.client, self.model.parameters(), server_round)
            return self._fit_private(parameters, loader, optimizer, server_round)
        metrics = local_sgd(self.cfg, self.model, train_set, server_round, self.partition_id)
        return get_weights(self.model), len(self.train_set), {CLIENT_ID_KEY: self.partition_id, **metrics}

    def _fit_private(
        self, parameters: NDArrays, loader: DataLoader, optimizer: torch.optim.Optimizer, server_round: int
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """DP-SGD on top of the restored ledger, or an explicit decline when over budget."""
        c = self.cfg.client
        plan = plan_client_dp(
            self.cfg.privacy.client,
            num_samples=len(self.train_set),
            batch_size=c.batch_size,
            local_epochs=c.local_epochs,
            num_rounds=self.cfg.num_rounds,
            warn=False,  # said once at start-up (components.check_client_dp)
        )
        ledger = self.load_ledger(plan.accountant)
        decline = self._decline_over_budget(ledger, plan, parameters, server_round, steps=plan.steps_per_round)
        if decline is not None:
            return decline
        private_model, private_optimizer, private_loader = make_private(
            self.model, optimizer, loader, plan=plan, ledger=ledger
        )
        try:
            metrics = train_epochs(private_model, private_loader, private_optimizer, c.local_epochs, self.cfg.runtime.device)
        finally:
            private_model.cleanup()
            self.save_ledger(ledger)  # also after a crash mid-round: those steps were taken
        return get_weights(self.model), len(self.train_set), {
            CLIENT_ID_KEY: self.partition_id,
            EPSILON_KEY: ledger.epsilon(plan.delta),
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "dp_steps": ledger.steps,
            **metrics,
        }

    def _fit_shared_noise(
        self, parameters: NDArrays, train_set: Dataset, server_round: int
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """One DP-SGD step with a share of the noise (record-level DP-FedSGD, :mod:`fedapp.dp_fedsgd`)."""
        plan = plan_shared_noise(
            self.cfg.privacy.client, min_contributors=self.cfg.secagg.min_contributors,
            num_rounds=self.cfg.num_rounds, batch_size=self.cfg.client.batch_size,
        )
        ledger = self.load_ledger(plan.accountant)
        decline = self._decline_over_budget(ledger, plan, parameters, server_round, steps=1)
        if decline is not None:
            return decline
        try:
            metrics = noisy_gradient_step(
                self.model, train_set, plan=plan, lr=round_lr(self.cfg.client, server_round),
                device=self.cfg.runtime.device,
            )
        finally:  # booked even if the step failed half way: never under-report
            ledger.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=1)
            self.save_ledger(ledger)
        return get_weights(self.model), len(self.train_set), {
            CLIENT_ID_KEY: self.partition_id,
            EPSILON_KEY: ledger.epsilon(plan.delta),
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "noise_share_multiplier": plan.share_multiplier,
            "dp_steps": ledger.steps,
            **metrics,
        }

    def _decline_over_budget(
        self, ledger: PrivacyLedger, plan: DPPlan | SharedNoisePlan, parameters: NDArrays, server_round: int,
        *, steps: int,
    ) -> tuple[NDArrays, int, dict[str, Scalar]] | None:
        """An explicit decline (not an exception) when this round's steps would pass the budget."""
        if plan.epsilon_budget <= 0:
            return None
        projected = ledger.epsilon_after(
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps, delta=plan.delta
        )
        if projected <= plan.epsilon_budget:
            return None
        spent = ledger.epsilon(plan.delta)
        reason = (
            f"training round {server_round} would raise epsilon from {spent:.4f} to {projected:.4f}, "
            f"over the budget {plan.epsilon_budget:g} (delta {plan.delta:g})"
        )
        log(INFO, "Client %s declines: %s", self.partition_id, reason)
        return parameters, 0, {
            CLIENT_ID_KEY: self.partition_id,
            DECLINED_KEY: 1,
            REASON_CODE_KEY: "privacy_budget",
            REASON_KEY: reason,
            EPSILON_KEY: spent,
        }

    def _ledger_path(self) -> Path | None:
        ledger_dir = self.cfg.privacy.client.ledger_dir
        return Path(ledger_dir) / f"partition-{self.partition_id}.json" if ledger_dir else None

    def load_ledger(self, accountant: str) -> PrivacyLedger:
        """This client's ledger: from ``context.state`` and/or disk, the copy with more steps."""
        ledger = PrivacyLedger(accountant)
        copies: list[tuple[str, dict]] = []
        if LEDGER_STATE_KEY in self.state:
            copies.append(("context.state", ledger_state_from_record(self.state[LEDGER_STATE_KEY])))
        path = self._ledger_path()
        if path is not None and path.exists():
            copies.append((str(path), PrivacyLedger.load(path).state_dict()))
        for where, state in copies:
            if state["mechanism"] != accountant:
                raise ConfigError(
                    f"client {self.partition_id}'s privacy ledger in {where} was kept with the "
                    f"{state['mechanism']!r} accountant but privacy.client.accountant={accountant!r}"
                )
            restored = PrivacyLedger(accountant)
            restored.load_state_dict(state)
            ledger = more_spent(ledger, restored)
        return ledger

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        """Write the ledger to ``context.state`` (and to ``ledger_dir`` when configured)."""
        if ledger.history:
            self.state[LEDGER_STATE_KEY] = ledger_state_to_record(ledger.state_dict())
        path = self._ledger_path()
        if path is not None:
            ledger.save(path)

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        if len(self.val_set) == 0:
            return 0.0, 0, {CLIENT_ID_KEY: self.partition_id}
        loss, acc = evaluate(self.model, self.val_set, self.cfg.runtime.eval_batch_size, self.cfg.runtime.device)
        return loss, len(self.val_set), {CLIENT_ID_KEY: self.partition_id, "accuracy": acc}


def check_unmask_request(msg: Message) -> None:
    """Refuse a SecAgg+ unmask request that names a node both alive and dropped, or this node as dropped.

    Flower's ``secaggplus_mod`` answers such a request with both the mask-seed
    share of a node listed as active and its secret-key share listed as dead,
    which lets a malicious server strip every mask from one client's vector.
    """
    from flwr.common import MessageType
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.UNMASK:
        return
    active = {int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, [])}
    dead = {int(n) for n in configs.get(Key.DEAD_NODE_ID_LIST, [])}
    if active & dead or msg.metadata.dst_node_id in dead:
        raise ValueError(
            f"SecAgg+ unmask request lists nodes {sorted(active & dead)} as both active and dropped (or this node as "
            "dropped): answering would reveal one client's masks; refused"
        )


def check_encrypt_instruction(config: dict[str, Scalar]) -> None:
    """Under Paillier a client trains only to encrypt, and only for the round it signs.

    A server that left out ``secagg.mode`` would otherwise get the update in the
    clear; one that sent each client its own ``server_round`` (which sets the
    learning-rate schedule) could shrink every other contributor's update, noise
    share included, to nothing, so that a sum of ``m`` signed updates is one
    client's. Every contribution in a decrypted set carries the same signed
    round, so tying the two makes the schedule the same for all of them.
    """
    if config.get(SECAGG_MODE) != MODE_ENCRYPT:
        raise ValueError(
            f"secagg.method is paillier but the server asked for {SECAGG_MODE}={config.get(SECAGG_MODE)!r}: "
            "refusing to train without encrypting"
        )
    if int(config.get("server_round", -1)) != int(config[SECAGG_ROUND]):
        raise ValueError(
            f"server_round={config.get('server_round')} differs from the signed round {config[SECAGG_ROUND]}: refusing"
        )


def clamped_values(old: NDArrays, new: NDArrays, bound: float) -> int:
    """How many coordinates of ``new - old`` lie outside Paillier's fixed-point range ``[-bound, bound]``.

    Counted on the update as it goes into encryption (a DP-FedSGD update already
    holds its noise share; a user-level share and ``secagg.clip_norm`` come
    after), and reported so that a clamp -- which biases the mean and which the
    Gaussian accounting does not cover -- shows in ``clients.jsonl``.
    """
    return int(sum(np.count_nonzero(np.abs(n - o) > bound) for o, n in zip(old, new)))


def train_seed(cfg: ExperimentConfig, server_round: int, partition_id: int) -> int:
    """Seed of a client's shuffling in a round (colluders recompute each other's updates with it)."""
    return cfg.seed * 100_003 + server_round * 1_009 + partition_id


def local_sgd(
    cfg: ExperimentConfig, model: torch.nn.Module, train_set: Dataset, server_round: int, partition_id: int
) -> dict[str, float]:
    """Plain local training of ``partition_id`` in ``server_round``, seeded so that it repeats exactly."""
    torch.manual_seed(train_seed(cfg, server_round, partition_id))
    loader = DataLoader(train_set, batch_size=cfg.client.batch_size, shuffle=True)
    optimizer = make_optimizer(cfg.client, model.parameters(), server_round)
    return train_epochs(model, loader, optimizer, cfg.client.local_epochs, device=cfg.runtime.device)


def poisoned_labels(train_set: Subset, attack: Attack, ctx: AttackContext) -> Dataset:
    """``train_set`` with the labels ``attack.poison_labels`` returns (same images; unchanged: same set)."""
    base = train_set.dataset
    if not isinstance(base, TensorDataset):
        raise TypeError(f"label poisoning needs a Subset of a TensorDataset, got {type(base).__name__}")
    idx = torch.as_tensor(train_set.indices, dtype=torch.long)
    y = base.tensors[1][idx]
    honest = y.numpy()
    labels = np.asarray(attack.poison_labels(honest.copy(), ctx))
    if labels.shape != honest.shape:
        raise ValueError(f"{attack!r}.poison_labels returned shape {labels.shape}, expected {honest.shape}")
    if np.array_equal(labels, honest):  # a pure model-poisoning attack: train on the set as it is
        return train_set
    return TensorDataset(base.tensors[0][idx], torch.as_tensor(labels, dtype=y.dtype))


def ledger_state_to_record(state: dict) -> ConfigRecord:
    """A ledger's ``state_dict`` as a ConfigRecord (one list per history column)."""
    history = state["history"]
    return ConfigRecord(
        {
            "mechanism": state["mechanism"],
            "noise_multiplier": [float(h[0]) for h in history],
            "sample_rate": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history],
        }
    )


def ledger_state_from_record(record: ConfigRecord) -> dict:
    """Inverse of :func:`ledger_state_to_record`."""
    columns = zip(record["noise_multiplier"], record["sample_rate"], record["steps"])
    return {"mechanism": str(record["mechanism"]), "history": [(float(s), float(q), int(n)) for s, q, n in columns]}


def partition_id_of(context: Context, cfg: ExperimentConfig) -> int:
    """The node's partition: ``partition-id`` from ``--node-config`` (or the simulation)."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        )
    num = int(node_config.get("num-partitions", cfg.partition.num_clients))
    if num != cfg.partition.num_clients:
        raise ValueError(
            f"SuperNode says num-partitions={num} but the experiment has partition.num_clients="
            f"{cfg.partition.num_clients}; start the nodes with the experiment's client count"
        )
    return int(node_config["partition-id"])


def raised_by_fedapp(ex: BaseException) -> bool:
    """Whether fedapp's own code raised ``ex``: its messages state policy and configuration, not data.

    Exceptions raised inside torch, Opacus or numpy may quote values computed from the
    client's data; under client DP only their type leaves the node.
    """
    tb = ex.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("fedapp.")


def make_client_app(cfg: ExperimentConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` or, when ``None``, for the run's ``run_config``."""

    def experiment_of(context: Context) -> ExperimentConfig:
        if cfg is not None:
            return cfg
        return pin_to_node(experiment_from_run_config(context.run_config), context.node_config)

    def client_fn(context: Context):  # noqa: ANN202 - flwr.client.Client
        experiment = experiment_of(context)
        torch.set_num_threads(max(1, int(experiment.runtime.num_cpus_per_client)))
        return FedappClient(
            experiment, partition_id_of(context, experiment), context.state, run_id=context.run_id
        ).to_client()

    def secagg_mod(msg: Message, context: Context, call_next: NextHandler) -> Message:
        """Flower's ``secaggplus_mod`` when the experiment says ``secagg.method=secaggplus``.

        Decided per message because under ``flwr run`` the configuration only
        arrives with the run (``context.run_config``), after the app is built.
        Under record-level DP-FedSGD it is :func:`fedapp.dp_fedsgd.dp_fedsgd_secaggplus_mod`
        (refuses rounds that could unmask fewer than ``min_contributors`` noise shares).
        """
        experiment = experiment_of(context)
        if experiment.secagg.method != "secaggplus":
            return call_next(msg, context)
        check_unmask_request(msg)
        dp = experiment.privacy.client
        if dp.enabled and dp.mode == "distributed":  # noise shares: refuse small rounds, unit weights
            from fedapp.dp_fedsgd import dp_fedsgd_secaggplus_mod

            return dp_fedsgd_secaggplus_mod(
                msg, context, call_next, min_contributors=experiment.secagg.min_contributors,
                clipping_range=experiment.secagg.clipping_range,
            )
        return secaggplus_mod(msg, context, call_next)

    def label_errors_mod(msg: Message, context: Context, call_next: NextHandler) -> Message:
        """Tag a ClientApp error with the partition, so the server's failure line names the client.

        Under client DP an error's text could carry data-dependent values past the release
        surface, so only its type leaves the node (the full error stays in the node's log).
        """
        try:
            return call_next(msg, context)
        except Exception as ex:
            who = context.node_config.get("partition-id", "?")
            try:
                private = experiment_of(context).privacy.client.enabled
            except Exception:  # noqa: BLE001 - a config that does not parse is no reason to say more
                private = True
            if private and not raised_by_fedapp(ex):
                log(WARNING, "Client %s error (only its type is sent under client DP): %s", who, ex)
                raise ClientError(f"[client {who}] {type(ex).__name__} (details withheld under client DP)") from None
            if len(ex.args) == 1 and isinstance(ex.args[0], str):  # keep the type (callers catch it), tag the text
                ex.args = (f"[client {who}] {type(ex).__name__}: {ex.args[0]}",)
                raise
            raise ClientError(f"[client {who}] {type(ex).__name__}: {ex}") from ex

    # Outermost first: errors get the client's tag; injected faults act on the wire-level reply; the release surface filters the
    # client's own reply before SecAgg+ masks it.
    return ClientApp(client_fn=client_fn, mods=[label_errors_mod, make_faults_mod(experiment_of), secagg_mod, make_release_mod(experiment_of)])


app = make_client_app()
