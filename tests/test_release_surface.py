"""The release surface: every key of every reply in every privacy mode is declared, and the mod enforces it.

Threat model: the server (honest-but-curious, or DP's adversary who knows all
of a client's records but one) reads everything a client sends. The first test
fails as soon as anyone adds a metric to a client reply without declaring it in
:mod:`fedapp.release`; the others check that the Flower mod really drops what
is not sendable, fixes ``num_examples`` and refuses federated evaluation where
no mechanism covers it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.common import (
    Code,
    Context,
    EvaluateIns,
    FitIns,
    FitRes,
    Message,
    MessageType,
    Metadata,
    RecordDict,
    Status,
    ndarrays_to_parameters,
)
from flwr.app.message.message import make_message
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_fitres,
)

from fedapp.client_app import FedappClient
from fedapp.components import new_model
from fedapp.config import ExperimentConfig
from fedapp.crypto.dealing import deal_federation
from fedapp.crypto.protocol import MODE_ENCRYPT, SECAGG_KEY_ID, SECAGG_MODE, SECAGG_ROUND
from fedapp.release import (
    CENTRAL_DP,
    CLIENT_DP_DISTRIBUTED,
    CLIENT_DP_LOCAL,
    DECRYPT,
    DISTRIBUTED_DP,
    FIT,
    NUM_EXAMPLES,
    PARAMETERS,
    PLAIN,
    SECURE_AGGREGATION,
    SURFACES,
    Release,
    ReleaseRefused,
    make_release_mod,
    privacy_mode,
)
from fedapp.crypto.vectors import MAGIC
from fedapp.training import get_weights

BITS = 512


def experiment(tmp_path: Path, **overrides: dict) -> ExperimentConfig:
    base = {
        "num_rounds": 2,
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 300, "synthetic_test_size": 60},
        "partition": {"num_clients": 3},
        "model": {"name": "cnn_mnist_small"},
        "client": {"batch_size": 20, "lr": 0.1, "momentum": 0.0},
        "runtime": {"output_dir": str(tmp_path / "run")},
    }
    for group, values in overrides.items():
        base[group] = {**base.get(group, {}), **values}
    return ExperimentConfig.from_dict(base)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    deal_federation(path, num_clients=3, threshold=2, min_contributors=3, bits=BITS)
    return path


def modes(tmp_path: Path, key_dir: Path) -> dict[str, ExperimentConfig]:
    paillier = {"method": "paillier", "key_dir": str(key_dir), "key_bits": BITS, "min_contributors": 3}
    local = {"enabled": True, "mode": "local", "noise_multiplier": 1.0}
    return {
        PLAIN: experiment(tmp_path),
        CENTRAL_DP: experiment(tmp_path, privacy={"central": {"enabled": True}}),
        SECURE_AGGREGATION: experiment(tmp_path, secagg=paillier),
        DISTRIBUTED_DP: experiment(tmp_path, secagg={**paillier, "clip_norm": 1.0, "noise_sigma_total": 0.1}),
        CLIENT_DP_LOCAL: experiment(tmp_path, privacy={"client": local}),
        CLIENT_DP_DISTRIBUTED: experiment(
            tmp_path, secagg=paillier,
            privacy={"client": {"enabled": True, "mode": "distributed", "sample_rate": 0.2, "noise_multiplier": 1.0}},
        ),
    }


def fit_config(cfg: ExperimentConfig, key_dir: Path, server_round: int = 1) -> dict:
    config = {"server_round": server_round}
    if cfg.secagg.method == "paillier":
        from fedapp.crypto import load_public_key

        config |= {SECAGG_MODE: MODE_ENCRYPT, SECAGG_ROUND: server_round, SECAGG_KEY_ID: load_public_key(key_dir).key_id}
    return config


def test_every_key_a_client_produces_is_declared_in_its_mode(tmp_path: Path, key_dir: Path) -> None:
    # Prepare: each privacy mode's experiment, plus a simulated attacker in each (its reply must look the same);
    # every call a new round (a client signs one contribution per round)
    rounds = iter(range(1, 100))
    for mode, cfg in modes(tmp_path, key_dir).items():
        assert privacy_mode(cfg) == mode
        surface = SURFACES[mode]
        weights = get_weights(new_model(cfg))
        for attacker in (False, True):
            if attacker:
                cfg.attack.name, cfg.attack.clients = "gaussian", "0"

            # Execute: what the client itself puts in a fit reply, before the release layer
            _, _, metrics = FedappClient(cfg, 0).fit(weights, fit_config(cfg, key_dir, next(rounds)))

            # Assert: no undeclared key; whatever is sendable has a reason on record
            undeclared = sorted(set(metrics) - set(surface.replies[FIT]))
            assert not undeclared, f"{mode}: keys {undeclared} are not declared in fedapp.release"
            assert {PARAMETERS, NUM_EXAMPLES} <= set(surface.replies[FIT])


def test_client_dp_modes_send_no_data_dependent_field(tmp_path: Path, key_dir: Path) -> None:
    for mode in (CLIENT_DP_LOCAL, CLIENT_DP_DISTRIBUTED, DISTRIBUTED_DP, SECURE_AGGREGATION):
        surface = SURFACES[mode]
        assert surface.num_examples == 1, mode  # the record count stays home
        for key in ("train_loss", "train_accuracy", "dp_batch", "secagg_clamped"):
            assert surface.status(FIT, key) is Release.NEVER, (mode, key)
        sendable = {k for k, f in surface.replies[FIT].items() if f.status is not Release.NEVER}
        assert sendable - {PARAMETERS, NUM_EXAMPLES} <= {
            "partition_id", "declined", "reason_code", "reason", "epsilon", "delta", "noise_multiplier", "dp_steps",
            "noise_share_multiplier",
        }, mode
        assert "evaluate" not in surface.replies  # never: an exact validation loss leaks membership too
    assert SURFACES[PLAIN].status(FIT, "train_loss") is Release.PUBLIC


def _instruction(content: RecordDict, message_type: str) -> Message:
    """An instruction as the SuperNode hands it to the ClientApp."""
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return make_message(metadata, content)


def _train_message(config: dict) -> Message:
    ins = FitIns(ndarrays_to_parameters([np.zeros(3)]), config)
    return _instruction(fitins_to_recorddict(ins, keep_input=True), MessageType.TRAIN)


def _reply(msg: Message, num_examples: int, metrics: dict, arrays: list[np.ndarray] | None = None) -> Message:
    arrays = arrays if arrays is not None else [np.frombuffer(MAGIC + b"ciphertext", dtype=np.uint8), np.zeros(64, np.uint8)]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, metrics)
    return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def test_mod_drops_everything_not_declared_and_fixes_the_count(tmp_path: Path, key_dir: Path) -> None:
    # Prepare: a client that leaks its exact loss, sample size and a metric added "later"
    cfg = modes(tmp_path, key_dir)[CLIENT_DP_DISTRIBUTED]
    mod = make_release_mod(lambda context: cfg)
    msg = _train_message({"server_round": 1})
    leaky = {"partition_id": 2, "epsilon": 0.5, "train_loss": 2.302, "dp_batch": 3.0, "secagg_clamped": 0,
             "added_later": 1.0}

    # Execute
    out = mod(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
              lambda m, c: _reply(m, 14, leaky))

    # Assert
    res = recorddict_to_fitres(out.content, keep_input=True)
    assert res.metrics == {"partition_id": 2, "epsilon": 0.5}
    assert res.num_examples == 1
    assert len(res.parameters.tensors) == 2  # the encrypted update and its signature go on


def test_mod_refuses_an_update_in_the_clear_under_paillier(tmp_path: Path, key_dir: Path) -> None:
    # Adversary: a server that leaves secagg.mode out, hoping the client trains and replies in the clear
    cfg = modes(tmp_path, key_dir)[CLIENT_DP_DISTRIBUTED]
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    with pytest.raises(ReleaseRefused, match="not an encrypted vector"):
        make_release_mod(lambda c: cfg)(_train_message({"server_round": 1}), ctx,
                                        lambda m, c: _reply(m, 14, {"epsilon": 0.5}, [np.ones(3, np.float32)]))


def test_mod_keeps_declines_at_zero_examples_and_plain_mode_exact(tmp_path: Path, key_dir: Path) -> None:
    dp_cfg, plain_cfg = modes(tmp_path, key_dir)[CLIENT_DP_LOCAL], modes(tmp_path, key_dir)[PLAIN]
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg = _train_message({"server_round": 1})

    declined = make_release_mod(lambda c: dp_cfg)(msg, ctx, lambda m, c: _reply(m, 0, {"declined": 1, "reason": "budget"}))
    plain = make_release_mod(lambda c: plain_cfg)(msg, ctx, lambda m, c: _reply(m, 14, {"train_loss": 0.3}))

    assert recorddict_to_fitres(declined.content, keep_input=True).num_examples == 0
    res = recorddict_to_fitres(plain.content, keep_input=True)
    assert (res.num_examples, res.metrics) == (14, {"train_loss": 0.3})


def test_mod_refuses_federated_evaluation_under_client_dp(tmp_path: Path, key_dir: Path) -> None:
    cfg = modes(tmp_path, key_dir)[CLIENT_DP_LOCAL]
    ins = EvaluateIns(ndarrays_to_parameters([np.zeros(3)]), {})
    msg = _instruction(evaluateins_to_recorddict(ins, keep_input=True), MessageType.EVALUATE)
    called = []

    with pytest.raises(ReleaseRefused, match="never sent"):
        make_release_mod(lambda c: cfg)(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                                     run_config={}), lambda m, c: called.append(m))
    assert not called  # the client never even evaluated


def test_decryptor_replies_have_their_own_declared_surface() -> None:
    surface = SURFACES[CLIENT_DP_DISTRIBUTED]
    assert surface.sendable(DECRYPT, "secagg.share_index")
    assert not surface.sendable(DECRYPT, "train_loss")
