"""Client faults injected as a Flower mod, outermost: what the network and the process would do.

A mod (not code inside the client) because a fault is not the client's
training: a crash, a hang or a lost connection happens around it, and a
malformed or replayed update is what reaches the wire after every other mod
(release surface, SecAgg+) has run. The plan (:mod:`fedapp.faults.plan`) is
recomputed from the run config in every ClientApp process, so it works the same
in the simulation engine and on real SuperNodes.
"""

from __future__ import annotations

import os
import time
from logging import WARNING
from typing import Callable

import numpy as np
from flwr.common import ArrayRecord, Context, Message, MessageType, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedapp.config import ExperimentConfig
from fedapp.faults.malform import malform
from fedapp.faults.plan import fault_for

NextHandler = Callable[[Message, Context], Message]
LAST_UPDATE_KEY = "fedapp.faults.last_update"  # a replaying client's previous update, in context.state
FIT_CONFIG = "fitins.config"


class InjectedFault(RuntimeError):
    """A client failure made on purpose by ``faults.kind``."""


def _round_of(msg: Message) -> int | None:
    config = msg.content.config_records.get(FIT_CONFIG)
    if config is None or "server_round" not in config:
        return None
    if config.get("secagg.mode") == "decrypt":  # Paillier's decryption sub-round is not training
        return None
    return int(config["server_round"])


def make_faults_mod(experiment_of: Callable[[Context], ExperimentConfig]) -> Callable[[Message, Context, NextHandler], Message]:
    """The mod that carries out ``faults.*`` of the run on this node's TRAIN messages."""

    def faults_mod(msg: Message, context: Context, call_next: NextHandler) -> Message:
        cfg = experiment_of(context)
        if cfg.faults.kind == "none" or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        server_round = _round_of(msg)
        partition_id = int(context.node_config.get("partition-id", -1))
        fault = None if server_round is None else fault_for(cfg.faults, partition_id, server_round)
        if fault is None:
            reply = call_next(msg, context)
            if cfg.faults.kind == "replay":
                _remember(reply, context)
            return reply
        log(WARNING, "Client %s: injecting fault %r in round %s (faults.kind)", partition_id, fault, server_round)
        return _inject(fault, cfg, msg, context, call_next, partition_id, int(server_round or 0))

    return faults_mod


def _inject(
    fault: str, cfg: ExperimentConfig, msg: Message, context: Context, call_next: NextHandler,
    partition_id: int, server_round: int,
) -> Message:
    f = cfg.faults
    if fault == "exit":  # the ClientApp process dies before it answers
        os._exit(17)
    if fault == "hang":
        time.sleep(f.hang_s)
        return call_next(msg, context)
    started = time.monotonic()
    reply = call_next(msg, context)
    if fault == "crash":
        raise InjectedFault(f"injected crash on client {partition_id} in round {server_round} (faults.kind=crash)")
    if fault == "straggler":
        time.sleep((f.slowdown - 1.0) * (time.monotonic() - started))
        return reply
    if fault == "drop":  # trained, then the connection is gone: no reply
        if cfg.runtime.mode == "processes":
            os._exit(18)
        time.sleep(f.hang_s)
        return reply
    if not reply.has_content():
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = parameters_to_ndarrays(fitres.parameters)
    if fault == "malformed":
        sent = compat.recorddict_to_fitins(msg.content, keep_input=True)
        rng = np.random.default_rng([f.seed, server_round, partition_id, 0xBAD])
        update = malform(f.malformation, parameters_to_ndarrays(sent.parameters), update, rng)
    elif fault == "replay":
        previous = context.state.array_records.get(LAST_UPDATE_KEY)
        if previous is None:  # nothing to replay yet: this update is the one replayed next time
            _remember(reply, context)
            return reply
        update = [array.numpy() for array in previous.values()]
    fitres.parameters = ndarrays_to_parameters(update)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply


def _remember(reply: Message, context: Context) -> None:
    if not reply.has_content():
        return
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitres.parameters)
    context.state.array_records[LAST_UPDATE_KEY] = ArrayRecord(arrays)
