"""Record-level DP-FedSGD under Flower's SecAgg+: the same noise shares and ledger as under Paillier.

What must hold (reasons in :mod:`fedapp.dp_fedsgd`): every sum SecAgg+ can
unmask holds at least ``m = secagg.min_contributors`` updates of equal weight,
so its noise is the sum of at least ``m`` shares; the unmasked mean carries
exactly that noise through SecAgg+'s weighting, clipping and quantisation;
each client's ledger books one ``(sigma, q)`` step per round; and whatever
would let a sum hold fewer shares is refused -- at start-up by the
configuration check, in each round's setup by every client.

Most tests drive Flower's real ``SecAggPlusWorkflow`` against real fedapp
ClientApps in one process (:class:`InProcessGrid`: each message serialised and
handed to the node's app, a raised exception returned as an error reply), which
takes a second and lets a test drop a client at a chosen stage; one test runs
the whole experiment in Flower's simulation engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from flwr.client import ClientApp
from flwr.common import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

from fedapp.client_app import LEDGER_STATE_KEY, FedappClient, ledger_state_from_record, make_client_app
from fedapp.components import check_experiment, new_model
from fedapp.components import test_data as server_test_set  # (not a test)
from fedapp.config import ConfigError, ExperimentConfig
from fedapp.dp_fedsgd import (
    SecAggPlusRoundRefused,
    dp_fedsgd_secaggplus_mod,
    plan_shared_noise,
    secaggplus_quantisation_warnings,
)
from fedapp.hydra_config import compose_experiment
from fedapp.server_app import secaggplus_workflow
from fedapp.training import evaluate, get_weights
from tests.test_dp_fedsgd import google_rdp_epsilon

DELTA = 1e-5
SIGMA = 1.5




def raw_experiment(tmp_path: Path) -> dict:
    """Three clients of 180 training records; q = 1/6 -> expected batch 30; every sum needs all three."""
    return {
        "num_rounds": 2,
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 600, "synthetic_test_size": 100},
        "partition": {"num_clients": 3},
        "model": {"name": "cnn_mnist_small"},
        "client": {"batch_size": 30, "lr": 0.1, "momentum": 0.0},
        "strategy": {"min_fit_clients": 3, "min_available_clients": 3},
        "secagg": {"method": "secaggplus", "min_contributors": 3, "num_shares": 1.0,
                   "reconstruction_threshold": 1.0, "clipping_range": 8.0, "quantization_range": 2**24},
        "runtime": {"output_dir": str(tmp_path / "run")},
        "privacy": {"client": {"enabled": True, "mode": "distributed", "sample_rate": 1 / 6,
                               "noise_multiplier": SIGMA, "delta": DELTA}},
    }


def experiment(tmp_path: Path, **sections: dict) -> ExperimentConfig:
    raw = raw_experiment(tmp_path)
    for section, values in sections.items():
        if section == "privacy":
            raw["privacy"]["client"].update(values["client"])
        else:
            raw[section].update(values)
    return ExperimentConfig.from_dict(raw)


# --- an in-process SecAgg+ round: Flower's workflow and fedapp's ClientApps, no Ray --------------

NODE_IDS = (101, 102, 103)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a SuperLink-launched process would have set: Flower's Message needs it to address a message."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1 if name == "_run_id" else 0)


class InProcessGrid:
    """Delivers each message, serialised and parsed like on the wire, to its node's ClientApp.

    ``drop(stage, node_id)`` true makes that node's reply vanish (a dropout). A
    ClientApp exception becomes an error reply, as Flower returns it.
    """

    def __init__(self, apps: dict[int, ClientApp], contexts: dict[int, Context],
                 drop: Callable[[str, int], bool] = lambda stage, nid: False) -> None:
        self.apps, self.contexts, self.drop = apps, contexts, drop
        self.refusals: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201 - Grid's signature
        replies = []
        for sent in messages:
            msg = message_from_proto(message_to_proto(sent))
            nid = msg.metadata.dst_node_id
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            try:
                reply = self.apps[nid](msg, self.contexts[nid])
            except Exception as exc:  # noqa: BLE001 - what Flower does with a failing ClientApp
                self.refusals.append(str(exc))
                reply = Message(Error(code=0, reason=str(exc)), reply_to=msg)
            if not self.drop(stage, nid):
                replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def node_context(nid: int, pid: int, state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=nid, node_config={"partition-id": pid, "num-partitions": len(NODE_IDS)},
                   state=state if state is not None else RecordDict(), run_config={})


def run_secaggplus_round(
    cfg: ExperimentConfig, *, app: ClientApp | None = None, clients_per_round: int = 3,
    drop: Callable[[str, int], bool] = lambda stage, nid: False, server_round: int = 1,
    contexts: dict[int, Context] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], InProcessGrid]:
    """One SecAgg+ fit round of ``cfg`` (workflow as the ServerApp builds it); (global before, after, grid)."""
    app = app or make_client_app(cfg)
    contexts = contexts or {nid: node_context(nid, pid) for pid, nid in enumerate(NODE_IDS)}
    grid = InProcessGrid({nid: app for nid in NODE_IDS}, contexts, drop)
    manager = SimpleClientManager()
    for nid in NODE_IDS:
        manager.register(GridClientProxy(nid, grid, run_id=1))
    strategy = FedAvg(fraction_fit=clients_per_round / len(NODE_IDS), min_fit_clients=clients_per_round,
                      min_available_clients=len(NODE_IDS), on_fit_config_fn=lambda r: {"server_round": r})
    server = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    before = get_weights(new_model(cfg))
    server.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": server_round})
    server.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(before), keep_input=True
    )
    secaggplus_workflow(cfg)(grid, server)
    after = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(server.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    )
    return before, after, grid


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays]).astype(np.float64)


def steps_booked(context: Context) -> int:
    if LEDGER_STATE_KEY not in context.state:
        return 0
    return sum(h[2] for h in ledger_state_from_record(context.state[LEDGER_STATE_KEY])["history"])


# --- (a) combinations under which a sum could carry fewer shares are refused, with the reason ------


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"secagg": {"min_contributors": 1}}, r"min_contributors >= 2"),
        ({"secagg": {"reconstruction_threshold": 0.5}}, r"reconstruction threshold >= secagg.min_contributors=3"),
        ({"secagg": {"reconstruction_threshold": 2.0, "num_shares": 3.0}}, r"gives 2 of 3 clients"),
        ({"strategy": {"fraction_fit": 0.5, "min_fit_clients": 2}}, r"samples 2 clients a round"),
        ({"privacy": {"client": {"epsilon_budget": 5.0}}}, r"epsilon_budget=5 with a given noise_multiplier"),
        ({"secagg": {"method": "none"}}, r"needs secagg.method='paillier' or 'secaggplus'"),
        ({"secagg": {"noise_sigma_total": 1.0}}, r"noise_sigma_total"),
        ({"client": {"momentum": 0.9}}, r"one plain SGD step"),
    ],
)
def test_unsound_secaggplus_settings_are_refused_at_start_up_with_their_reason(
    tmp_path: Path, override: dict, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        experiment(tmp_path, **override)
    assert "\n" not in str(caught.value)  # one line


def test_sound_settings_pass_the_full_check_and_every_weight_ratio_is_one(tmp_path: Path) -> None:
    cfg = experiment(tmp_path, secagg={"max_weight": 4})  # Paillier's weight: unused under SecAgg+
    check_experiment(cfg, load_data=False)
    # secagg.max_num_examples (10000 here) is unused: the server's max_weight is the constant count clients send
    assert cfg.secagg.max_num_examples == 10000 and secaggplus_workflow(cfg).max_weight == 1.0
    with_target = experiment(tmp_path, privacy={"client": {"noise_multiplier": 0.0, "target_epsilon": 2.0,
                                                           "epsilon_budget": 2.5}})
    assert with_target.privacy.client.epsilon_budget == 2.5  # a budget at or above the target never binds


def test_preset_is_the_paillier_preset_but_for_secure_aggregation() -> None:
    secaggplus = compose_experiment(["+experiment=dp_fedsgd_secaggplus_mnist"])
    paillier = compose_experiment(["+experiment=dp_fedsgd_mnist"])
    check_experiment(secaggplus, load_data=False)
    a, b = secaggplus.to_dict(), paillier.to_dict()
    for cfg in (a, b):
        cfg.pop("secagg"), cfg.pop("name")
    assert a == b
    sa = secaggplus.secagg
    assert (sa.method, sa.min_contributors, sa.reconstruction_threshold) == ("secaggplus", 10, 1.0)
    assert secaggplus_workflow(secaggplus).max_weight == 1.0
    assert sa.min_contributors == paillier.secagg.min_contributors  # the same shares: sigma / sqrt(9) each
    plan = plan_shared_noise(secaggplus.privacy.client, min_contributors=10, num_rounds=secaggplus.num_rounds,
                             batch_size=secaggplus.client.batch_size)
    # the preset's encoding is fine for the epsilon-1 schedule too (smallest share, lr decay 0.985)
    small_lr = secaggplus.client.lr * 0.985 ** (secaggplus.num_rounds - 1)
    assert secaggplus_quantisation_warnings(
        replace(plan, share_multiplier=plan.share_multiplier / 2), lr=small_lr, clipping_range=sa.clipping_range,
        quantization_range=sa.quantization_range, max_abs_parameter=2.0,  # measured: 1.77 at epsilon 3
    ) == []


def test_too_coarse_quantisation_or_too_narrow_clipping_range_is_warned_about(tmp_path: Path) -> None:
    cfg = experiment(tmp_path)
    plan = plan_shared_noise(cfg.privacy.client, min_contributors=3, num_rounds=2, batch_size=30)
    share_std = 0.1 * plan.share_multiplier * 1.0 / 30  # lr x share x C / B = 3.5e-3
    sa = cfg.secagg

    fine = secaggplus_quantisation_warnings(plan, lr=0.1, clipping_range=sa.clipping_range,
                                            quantization_range=sa.quantization_range, max_abs_parameter=0.2)
    coarse = secaggplus_quantisation_warnings(plan, lr=0.1, clipping_range=8.0, quantization_range=2**10,
                                              max_abs_parameter=0.2)
    narrow = secaggplus_quantisation_warnings(plan, lr=0.1, clipping_range=0.2, quantization_range=2**24,
                                              max_abs_parameter=0.2)

    assert fine == []
    assert len(coarse) == 1 and "raise secagg.quantization_range" in coarse[0] and f"{share_std:.3g}" in coarse[0]
    assert len(narrow) == 1 and "raise secagg.clipping_range" in narrow[0]


# --- (b) end to end in Flower's simulation engine --------------------------------------------------


@pytest.mark.slow
def test_simulation_under_secaggplus_trains_and_books_one_step_per_client_and_round(tmp_path: Path) -> None:
    from fedapp.simulation import run_in_simulation

    cfg = experiment(tmp_path)

    summary = run_in_simulation(cfg)

    out = Path(cfg.runtime.output_dir)
    rows = [r for r in json.loads((out / "metrics.json").read_text()) if r["round"] >= 1]
    assert [r["fit_clients"] for r in rows] == [3, 3]
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    fit_rows = [c for c in clients if "epsilon" in c]
    assert len(fit_rows) == 6 and all(c["num_examples"] == 1 for c in fit_rows)
    last = {c["partition_id"]: c for c in fit_rows if c["round"] == 2}
    assert sorted(last) == [0, 1, 2]
    for c in last.values():  # exactly two steps at (sigma, q), not the share, by Google's accountant
        assert c["dp_steps"] == 2
        assert c["epsilon"] == pytest.approx(google_rdp_epsilon(SIGMA, 1 / 6, 2), rel=0.01)
    assert rows[-1]["epsilon_max"] == pytest.approx(google_rdp_epsilon(SIGMA, 1 / 6, 2), rel=0.01)
    # the model moved: its test loss is no longer the initial model's
    initial_loss, _ = evaluate(new_model(cfg), server_test_set(cfg))
    assert summary["rounds"] == 2
    assert summary["final_test_loss"] != pytest.approx(initial_loss, rel=1e-6)


# --- (c) the unmasked mean carries the sum of the shares, through SecAgg+'s encoding --------------


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # q ~ 0: epsilon ~ 0 at every order
def test_unmasked_sum_of_zero_gradient_updates_has_the_noise_of_every_share(tmp_path: Path) -> None:
    # Prepare: q ~ 0, so each client's update is its noise share alone; m = 3 clients, each share sigma/sqrt(2)
    cfg = experiment(tmp_path, privacy={"client": {"sample_rate": 1e-9}})
    lr, b = cfg.client.lr, cfg.client.batch_size

    # Execute: one SecAgg+ round through Flower's workflow and fedapp's ClientApps
    before, after, grid = run_secaggplus_round(cfg)

    # Assert: sum of updates = 3 x (mean - global); std lr sigma C / B x sqrt(3 / 2) (26k values: ~1 %)
    assert grid.refusals == []
    total = len(NODE_IDS) * (flat(after) - flat(before))
    one_sigma = lr * SIGMA * 1.0 / b  # what any m - 1 = 2 shares carry
    assert total.std() == pytest.approx(one_sigma * math.sqrt(3 / 2), rel=0.03)
    assert abs(total.mean()) < 0.05 * one_sigma


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_weight_is_pinned_to_one_whatever_the_client_reports(tmp_path: Path) -> None:
    # Prepare: the mod alone around a client that reports its record count (180), no release layer
    cfg = experiment(tmp_path, privacy={"client": {"sample_rate": 1e-9}})

    def client_fn(context: Context):  # noqa: ANN202
        return FedappClient(cfg, int(context.node_config["partition-id"]), context.state).to_client()

    mod = partial(dp_fedsgd_secaggplus_mod, min_contributors=3, clipping_range=cfg.secagg.clipping_range)
    bare = ClientApp(client_fn=client_fn, mods=[lambda m, c, n: mod(m, c, n)])

    # Execute
    before, after, _ = run_secaggplus_round(cfg, app=bare)

    # Assert: still the plain sum of three shares (weight 180 would overflow the 2**32 masking modulus)
    total = len(NODE_IDS) * (flat(after) - flat(before))
    assert total.std() == pytest.approx(cfg.client.lr * SIGMA / cfg.client.batch_size * math.sqrt(3 / 2), rel=0.03)


def test_the_ledger_books_one_step_per_round_across_secaggplus_rounds(tmp_path: Path) -> None:
    cfg = experiment(tmp_path)
    contexts = {nid: node_context(nid, pid) for pid, nid in enumerate(NODE_IDS)}

    moved = []
    for r in (1, 2):
        before, after, _ = run_secaggplus_round(cfg, contexts=contexts, server_round=r)
        moved.append(not np.allclose(flat(before), flat(after)))

    assert moved == [True, True]
    assert [steps_booked(contexts[nid]) for nid in NODE_IDS] == [2, 2, 2]


# --- (d) a client refuses a round that could unmask fewer than m shares ---------------------------


def setup_message(sample_num: int, threshold: int, max_weight: float = 1.0) -> Message:
    record = ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample_num, Key.SHARE_NUMBER: sample_num,
        Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**24, Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: max_weight,
    })
    return Message(RecordDict({RECORD_KEY_CONFIGS: record}), dst_node_id=NODE_IDS[0], message_type=MessageType.TRAIN)


@pytest.mark.parametrize(
    ("sample_num", "threshold", "max_weight", "reason"),
    [(2, 2, 1.0, "set up for 2 clients, fewer than secagg.min_contributors=3"),
     (3, 2, 1.0, "reconstruction threshold is 2, below secagg.min_contributors=3"),
     (3, 3, 10000.0, r"num_examples / max_weight = 1 / 10000: .* weight exactly 1")],
)
def test_client_refuses_a_setup_that_could_unmask_fewer_than_m_shares_or_reweigh_them(
    tmp_path: Path, sample_num: int, threshold: int, max_weight: float, reason: str
) -> None:
    app = make_client_app(experiment(tmp_path))
    context = node_context(NODE_IDS[0], 0)

    with pytest.raises(SecAggPlusRoundRefused, match=reason) as caught:
        app(setup_message(sample_num, threshold, max_weight), context)
    assert "\n" not in str(caught.value)
    reply = app(setup_message(3, 3), context)  # a sound setup is answered with the node's public keys
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]


def test_a_server_sampling_fewer_than_m_gets_no_round_and_no_step_is_taken(tmp_path: Path) -> None:
    # Prepare: the clients' experiment says m = 3; this server samples 2 of them
    cfg = experiment(tmp_path)
    contexts = {nid: node_context(nid, pid) for pid, nid in enumerate(NODE_IDS)}

    # Execute
    before, after, grid = run_secaggplus_round(cfg, clients_per_round=2, contexts=contexts)

    # Assert: both sampled clients refused at setup; nothing trained, nothing released
    assert len(grid.refusals) == 2 and all("fewer than secagg.min_contributors=3" in r for r in grid.refusals)
    assert np.array_equal(flat(before), flat(after))
    assert [steps_booked(contexts[nid]) for nid in NODE_IDS] == [0, 0, 0]


def test_a_dropout_after_training_leaves_the_round_unreleased_when_threshold_is_m(tmp_path: Path) -> None:
    # Prepare: one client's masked vector never arrives (it trained and booked its step)
    cfg = experiment(tmp_path)
    contexts = {nid: node_context(nid, pid) for pid, nid in enumerate(NODE_IDS)}

    # Execute
    before, after, _ = run_secaggplus_round(
        cfg, contexts=contexts, drop=lambda stage, nid: stage == Stage.COLLECT_MASKED_VECTORS and nid == NODE_IDS[0]
    )

    # Assert: a sum of 2 < m shares is never unmasked; every client that trained has booked it
    assert np.array_equal(flat(before), flat(after))
    assert [steps_booked(contexts[nid]) for nid in NODE_IDS] == [1, 1, 1]
