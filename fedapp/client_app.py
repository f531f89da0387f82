"""Flower ClientApp: a NumPyClient that trains on its partition of the data.

Nothing that must survive between rounds is kept on the client object: in a
deployment each message starts the ClientApp in a new process, so per-client
state belongs in ``context.state`` (Flower keeps it on the SuperNode).
"""

from __future__ import annotations

import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar
from torch.utils.data import DataLoader

from fedapp.components import client_data, new_model
from fedapp.config import ExperimentConfig
from fedapp.runconfig import experiment_from_run_config
from fedapp.training import evaluate, get_weights, make_optimizer, set_weights, train_epochs
from fedapp.wrappers import CLIENT_ID_KEY


class FedappClient(NumPyClient):
    """Local SGD on one partition; reports its partition id with every reply."""

    def __init__(self, cfg: ExperimentConfig, partition_id: int) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.model = new_model(cfg)
        self.train_set, self.val_set = client_data(cfg, partition_id)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        server_round = int(config.get("server_round", 0))
        torch.manual_seed(self.cfg.seed * 100_003 + server_round * 1_009 + self.partition_id)
        loader = DataLoader(self.train_set, batch_size=self.cfg.client.batch_size, shuffle=True)
        optimizer = make_optimizer(self.cfg.client, self.model.parameters())
        metrics = train_epochs(
            self.model, loader, optimizer, self.cfg.client.local_epochs, device=self.cfg.runtime.device
        )
        return get_weights(self.model), len(self.train_set), {CLIENT_ID_KEY: self.partition_id, **metrics}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        if len(self.val_set) == 0:
            return 0.0, 0, {CLIENT_ID_KEY: self.partition_id}
        loss, acc = evaluate(self.model, self.val_set, self.cfg.runtime.eval_batch_size, self.cfg.runtime.device)
        return loss, len(self.val_set), {CLIENT_ID_KEY: self.partition_id, "accuracy": acc}


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


def make_client_app(cfg: ExperimentConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` or, when ``None``, for the run's ``run_config``."""

    def client_fn(context: Context):  # noqa: ANN202 - flwr.client.Client
        experiment = cfg if cfg is not None else experiment_from_run_config(context.run_config)
        torch.set_num_threads(max(1, int(experiment.runtime.num_cpus_per_client)))
        return FedappClient(experiment, partition_id_of(context, experiment)).to_client()

    return ClientApp(client_fn=client_fn)


app = make_client_app()
