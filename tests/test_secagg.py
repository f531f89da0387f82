"""Paillier wrapper around FedAvg, driven by fake client proxies (512-bit keys, no simulation)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedMedian

from fedapp.crypto import Quantizer, SlotLayout, assert_no_private_key, generate_keypair
from fedapp.crypto.protocol import MODE_DECRYPT, SECAGG_MODE, SECAGG_ROUND, SECAGG_TOTAL_WEIGHT, SecAggSettings, decrypt_request, encrypt_update
from fedapp.secagg import PaillierSecureAggregation, integer_weights

BITS = 512
SETTINGS = SecAggSettings(layout=SlotLayout(bits=16, max_clients=4, key_bits=BITS), quantizer=Quantizer(bound=1.0, bits=16))
GLOBAL = [np.zeros((2, 3), dtype=np.float32), np.full(4, 0.5, dtype=np.float32)]


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(BITS)


class FakeClient(ClientProxy):
    """Stands in for a GridClientProxy: ``fit`` in decrypt mode is the client's decryptor step."""

    def __init__(self, cid: str, private_key, *, broken: bool = False) -> None:
        super().__init__(cid)
        self.private_key, self.broken, self.decrypt_calls = private_key, broken, 0

    def fit(self, ins, timeout, group_id):
        self.decrypt_calls += 1
        if self.broken:
            raise ConnectionError("node gone")
        arrays, weight = decrypt_request(
            parameters_to_ndarrays(ins.parameters), server_round=int(ins.config[SECAGG_ROUND]),
            private_key=self.private_key, settings=SETTINGS,
        )
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 0, {SECAGG_TOTAL_WEIGHT: weight})

    def get_properties(self, ins, timeout, group_id): ...
    def get_parameters(self, ins, timeout, group_id): ...
    def evaluate(self, ins, timeout, group_id): ...
    def reconnect(self, ins, timeout, group_id): ...


def _round(keys, clients, deltas, *, server_round=1):
    public, private = keys
    strategy = PaillierSecureAggregation(
        FedAvg(min_fit_clients=len(clients), min_available_clients=len(clients)), public_key=public, settings=SETTINGS
    )
    manager = SimpleClientManager()
    for c in clients:
        manager.register(c)
    instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(GLOBAL), manager)
    results = []
    for proxy, ins in instructions:
        delta = deltas.get(proxy.cid)
        if delta is None:  # dropped mid-round
            continue
        new = [g + d for g, d in zip(GLOBAL, delta)]
        arrays = encrypt_update(
            GLOBAL, new, server_round=int(ins.config[SECAGG_ROUND]), sender=proxy.cid, public_key=public,
            settings=SETTINGS, private_key=private,
        )
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, {})))
    return strategy, results


def _delta(seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, (2, 3)), rng.uniform(-0.5, 0.5, 4)]


def test_mean_of_encrypted_updates_with_a_dropped_client_and_a_broken_decryptor(keys):
    clients = [FakeClient(f"c{i}", keys[1], broken=(i == 0)) for i in range(4)]
    deltas = {f"c{i}": _delta(i) for i in (0, 1, 3)}  # c2 drops out
    strategy, results = _round(keys, clients, deltas)

    parameters, metrics = strategy.aggregate_fit(1, results, [])

    new = parameters_to_ndarrays(parameters)
    expected = [g + np.mean([deltas[c][k] for c in deltas], axis=0) for k, g in enumerate(GLOBAL)]
    for got, want in zip(new, expected):
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.max(np.abs(got - want)) <= SETTINGS.quantizer.error_bound(1) + 1e-6
    assert metrics["secagg_contributors"] == 3
    assert sum(c.decrypt_calls for c in clients if not c.broken) == 2  # two decryptors agreed


class MeetingClient(FakeClient):
    """A decryptor that only answers once another decryptor is working at the same time."""

    def __init__(self, cid: str, private_key, barrier: threading.Barrier) -> None:
        super().__init__(cid, private_key)
        self.barrier = barrier

    def fit(self, ins, timeout, group_id):
        if ins.config.get(SECAGG_MODE) == MODE_DECRYPT:
            self.barrier.wait()  # BrokenBarrierError (a failed decryptor) if asked one after the other
        return super().fit(ins, timeout, group_id)


def test_decryptors_are_asked_at_the_same_time(keys):
    barrier = threading.Barrier(2, timeout=5)
    clients = [MeetingClient(f"c{i}", keys[1], barrier) for i in range(3)]
    strategy, results = _round(keys, clients, {c.cid: _delta(i) for i, c in enumerate(clients)})

    parameters, metrics = strategy.aggregate_fit(1, results, [])

    assert parameters is not None and metrics["secagg_contributors"] == 3
    assert sum(c.decrypt_calls for c in clients) == 2


class LyingDecryptor(FakeClient):
    """Replies with a well-formed message whose decrypted codes are wrong in type, length or range."""

    def __init__(self, cid: str, private_key, lie: str) -> None:
        super().__init__(cid, private_key)
        self.lie = lie

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        if ins.config.get(SECAGG_MODE) != MODE_DECRYPT:
            return res
        codes = parameters_to_ndarrays(res.parameters)[0]
        codes = {
            "float": codes.astype(np.float64),
            "short": codes[:-1],
            "overflow": np.full_like(codes, np.iinfo(codes.dtype).max),
        }[self.lie]
        return FitRes(res.status, ndarrays_to_parameters([codes]), 0, res.metrics)


@pytest.mark.parametrize("lie", ["float", "short", "overflow"])
def test_a_malformed_decrypted_sum_is_refused_and_another_decryptor_asked(keys, lie):
    clients = [LyingDecryptor("c0", keys[1], lie)] + [FakeClient(f"c{i}", keys[1]) for i in range(1, 4)]
    deltas = {c.cid: _delta(i) for i, c in enumerate(clients)}
    strategy, results = _round(keys, clients, deltas)
    strategy._rng.shuffle = lambda proxies: proxies.sort(key=lambda p: p.cid)  # the liar is asked first

    parameters, _ = strategy.aggregate_fit(1, results, [])

    new = parameters_to_ndarrays(parameters)
    expected = [g + np.mean([deltas[c][k] for c in deltas], axis=0) for k, g in enumerate(GLOBAL)]
    assert all(np.max(np.abs(a - b)) <= SETTINGS.quantizer.error_bound(1) + 1e-6 for a, b in zip(new, expected))
    assert [c.decrypt_calls for c in clients] == [1, 1, 1, 0]  # liar refused, c2 asked in its place


def test_decryptors_send_back_exact_integer_codes_smaller_than_float64(keys):
    public, private = keys
    old = [np.zeros(300, dtype=np.float32)]
    sent = [encrypt_update(old, [np.full(300, 0.01 * i, dtype=np.float32)], server_round=1, sender=str(i),
                           public_key=public, settings=SETTINGS, private_key=private)[0] for i in range(2)]
    from fedapp.crypto import EncryptedVector, add_encrypted

    messages = [EncryptedVector.from_bytes(a, public) for a in sent]
    request = [add_encrypted(messages, public).to_ndarray(public)]

    (codes,), weight = decrypt_request(request, server_round=1, private_key=private, settings=SETTINGS)

    assert codes.dtype == np.uint32 and codes.nbytes == 300 * 4  # 16-bit codes + headroom for 4 clients
    assert weight == 2 and np.all(codes == codes[0])


def test_replayed_and_stale_updates_are_refused(keys):
    clients = [FakeClient(f"c{i}", keys[1]) for i in range(3)]
    deltas = {c.cid: _delta(i) for i, c in enumerate(clients)}
    strategy, results = _round(keys, clients, deltas)
    _, stale = _round(keys, clients, deltas, server_round=0)

    _, metrics = strategy.aggregate_fit(1, results + [results[0], stale[1]], [])

    assert metrics["secagg_contributors"] == 3 and metrics["secagg_refused"] == 2


def test_server_side_holds_no_private_key_and_robust_rules_are_refused(keys):
    # a strategy that smuggles the private key in (nested two levels deep) is refused at construction
    base = FedAvg()
    base.helper = {"cache": [keys[1]]}  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match="private key"):
        PaillierSecureAggregation(base, public_key=keys[0], settings=SETTINGS)
    # and the check itself finds a key wherever it sits, but passes a strategy after a real round
    with pytest.raises(AssertionError):
        assert_no_private_key({"a": [(1, keys[1].phe)]})
    strategy, _ = _round(keys, [FakeClient("c0", keys[1]), FakeClient("c1", keys[1])], {})
    assert_no_private_key(strategy)
    with pytest.raises(TypeError, match="plain FedAvg"):
        PaillierSecureAggregation(FedMedian(), public_key=keys[0], settings=SETTINGS)


def test_integer_weights():
    assert integer_weights([600, 300, 150], 1) == [1, 1, 1]
    assert integer_weights([600, 300, 150], 8) == [8, 4, 2]


def test_key_command_gives_the_server_the_public_key_only(tmp_path):
    from fedapp.keys import main

    assert main(["generate", "--dir", str(tmp_path / "clients"), "--public-dir", str(tmp_path / "server"), "--bits", "512"]) == 0
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == ["paillier_public.json"]
    assert main(["generate", "--dir", str(tmp_path / "clients"), "--bits", "512"]) == 1  # no silent overwrite


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strategy": {"name": "krum"}}, "only with strategy.name='fedavg'"),
        ({"strategy": {"name": "trimmedmean"}}, "only with strategy.name='fedavg'"),
        ({"strategy": {"name": "median"}}, "only with strategy.name='fedavg'"),
        ({"privacy": {"central": {"enabled": True}}}, "do not combine"),
    ],
)
def test_paillier_with_robust_rules_or_central_dp_is_refused_at_start_up(extra, message):
    from fedapp.config import ConfigError, ExperimentConfig
    from fedapp.strategies import check_strategy_config

    cfg = ExperimentConfig.from_dict({"secagg": {"method": "paillier", "key_dir": "keys"}, **extra})
    with pytest.raises(ConfigError, match=message):
        check_strategy_config(cfg)


def test_paillier_without_key_dir_is_a_config_error():
    from fedapp.config import ConfigError, ExperimentConfig

    with pytest.raises(ConfigError, match="fedapp.keys generate"):
        ExperimentConfig.from_dict({"secagg": {"method": "paillier"}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strategy": {"name": "krum"}}, "only with strategy.name='fedavg' or 'fedavgm'"),
        ({"strategy": {"name": "multikrum"}}, "only with strategy.name='fedavg' or 'fedavgm'"),
        ({"strategy": {"name": "trimmedmean"}}, "only with strategy.name='fedavg' or 'fedavgm'"),
        ({"strategy": {"name": "median"}}, "only with strategy.name='fedavg' or 'fedavgm'"),
        ({"privacy": {"central": {"enabled": True}}}, "central DP clips each update"),
        ({"defense": {"name": "detect"}}, "detector scores each client's update"),
    ],
)
def test_secaggplus_with_rules_that_need_individual_updates_is_refused_at_start_up(extra, message):
    from fedapp.config import ConfigError, ExperimentConfig
    from fedapp.strategies import check_strategy_config

    cfg = ExperimentConfig.from_dict({"secagg": {"method": "secaggplus"}, **extra})

    with pytest.raises(ConfigError, match=message):
        check_strategy_config(cfg)


def test_secaggplus_accepts_fedavgm_and_needs_no_key():
    from fedapp.config import ExperimentConfig
    from fedapp.strategies import check_strategy_config

    cfg = ExperimentConfig.from_dict({"secagg": {"method": "secaggplus"}, "strategy": {"name": "fedavgm"}})

    check_strategy_config(cfg)  # no error: FedAvgM needs only the mean


@pytest.mark.parametrize(
    ("secagg", "message"),
    [
        ({"num_shares": 2}, r"num_shares must be a fraction in \(0, 1\] .* or a whole count >= 3"),
        ({"num_shares": 4.5}, r"num_shares"),
        ({"num_shares": 5, "reconstruction_threshold": 5}, r"must be below secagg.num_shares=5"),
        ({"reconstruction_threshold": 0.0}, r"reconstruction_threshold must be a fraction"),
        ({"clipping_range": 0.0}, r"clipping_range must be > 0"),
        ({"quantization_range": 2**29}, r"below 2\*\*32"),
        ({"timeout_s": -1.0}, r"timeout_s must be >= 0"),
        ({"method": "secagg"}, r"secagg.method must be one of \['none', 'paillier', 'secaggplus'\]"),
    ],
)
def test_secaggplus_parameters_out_of_range_are_config_errors(secagg, message):
    from fedapp.config import ConfigError, ExperimentConfig

    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"secagg": {"method": "secaggplus", **secagg}})


def test_secaggplus_workflow_gets_counts_as_ints_and_fractions_as_floats():
    from fedapp.config import ExperimentConfig
    from fedapp.server_app import secaggplus_workflow

    counts = secaggplus_workflow(
        ExperimentConfig.from_dict({"secagg": {"method": "secaggplus", "num_shares": 5, "reconstruction_threshold": 3}})
    )
    fractions = secaggplus_workflow(ExperimentConfig.from_dict({"secagg": {"method": "secaggplus"}}))

    assert (counts.num_shares, counts.reconstruction_threshold) == (5, 3)
    assert isinstance(counts.num_shares, int) and isinstance(counts.reconstruction_threshold, int)
    assert (fractions.num_shares, fractions.reconstruction_threshold) == (1.0, 0.7)
    # every client sends the constant count 1 under secure aggregation (fedapp.release), so Flower's weight
    # ratio num_examples / max_weight must be exactly 1
    assert fractions.max_weight == 1.0 and fractions.timeout is None


def test_traffic_counts_update_nbytes_of_a_plain_reply_and_of_a_masked_vector():
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, ConfigRecord, FitRes, RecordDict, Status, ndarray_to_bytes, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedapp.traffic import payload_bytes, update_nbytes

    arrays = [np.zeros((10, 3), dtype=np.float32), np.zeros(5, dtype=np.float32)]  # 140 bytes
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 7, {})
    plain = compat.fitres_to_recorddict(fitres, keep_input=True)
    masked = RecordDict(
        {RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(np.zeros(35, dtype=np.int64))]})}
    )

    assert update_nbytes(plain) == 140
    assert update_nbytes(masked) == 280
    assert payload_bytes(plain) > 140  # serialised .npy headers and the metadata count too


def test_obfuscator_pool_is_refilled_off_the_reply_and_taken_only_once(tmp_path):
    from fedapp.crypto.pool_files import refill_in_background, take_obfuscators

    _, private_key = generate_keypair(512)
    path = tmp_path / "pools" / "partition-0.pool"

    refill_in_background(path, private_key, 3).join()
    first = take_obfuscators(path, private_key, 3)
    second = take_obfuscators(path, private_key, 3)

    assert first is not None and len(first) == 3
    assert second is None  # taken values were removed from disk: never reused
    assert not any(path.parent.iterdir())


def test_offline_pool_serves_several_rounds_with_distinct_values_then_runs_dry(tmp_path):
    from fedapp.crypto.pool_files import precompute_pool, remaining, take_obfuscators

    public_key, private_key = generate_keypair(512)
    path = tmp_path / "partition-3.pool"
    precompute_pool(path, private_key, 3 * 4)

    rounds = [take_obfuscators(path, private_key, 4) for _ in range(3)]

    values = [int(v) for pool in rounds for v in pool.take(4)]
    assert len(set(values)) == 12  # every value handed out once
    assert remaining(path) == 0 and take_obfuscators(path, private_key, 4) is None
    # each is a valid r^n mod n^2: encrypting with it decrypts correctly
    c = int((1 + 42 * public_key.n) * values[0] % public_key.nsquare)
    assert private_key.phe.raw_decrypt(c) == 42


def test_a_short_pool_is_discarded_not_mixed_with_online_values(tmp_path):
    from fedapp.crypto.pool_files import precompute_pool, take_obfuscators

    _, private_key = generate_keypair(512)
    path = tmp_path / "partition-0.pool"
    precompute_pool(path, private_key, 2)

    assert take_obfuscators(path, private_key, 5) is None
    assert not path.exists()


def test_a_refused_or_undecodable_ciphertext_is_recorded_against_its_node_not_a_server_crash(keys, tmp_path):
    from fedapp.metrics import RunRecorder

    clients = [FakeClient(str(i), keys[1]) for i in range(4)]
    strategy, results = _round(keys, clients, {str(i): _delta(i) for i in range(4)})
    results.sort(key=lambda r: r[0].cid)  # sampling order is random: index i is node i from here on
    recorder = RunRecorder(tmp_path)
    strategy.recorder = recorder
    broken = ndarrays_to_parameters([np.zeros(1)])
    broken.tensors[0] = b"\x93NUMPY not an array"
    results[1] = (results[1][0], FitRes(Status(Code.OK, ""), broken, 10, {}))
    results[2] = (results[2][0], results[0][1])  # client 0's ciphertext again, from node 2: a replay
    params, _ = strategy.aggregate_fit(1, results, [])
    refused = [e for e in recorder.drain() if e.get("kind") == "ciphertext_rejected"]
    assert sorted((e["node_id"], e["reason"].split(":")[0]) for e in refused) == [
        ("1", "ciphertext rejected (malformed)"), ("2", "ciphertext rejected (replay)"),
    ]
    assert params is not None  # the honest ciphertexts still aggregate
