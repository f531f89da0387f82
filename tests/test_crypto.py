"""Paillier vectors: packed sums, overflow headroom, integrity checks, key hygiene.

Keys are 512 bits (insecure, fast) and made once per module.
"""

from __future__ import annotations

import stat

import numpy as np
import pytest

from fedapp.crypto import (
    CiphertextRejected,
    EncryptedVector,
    LayoutError,
    ObfuscatorPool,
    Quantizer,
    ReplayGuard,
    SlotLayout,
    add_encrypted,
    assert_no_private_key,
    decrypt_aggregate,
    distributed_noise_std,
    encrypt_vector,
    generate_keypair,
    load_private_key,
    load_public_key,
    pack,
    save_keypair,
    unpack,
)

BITS = 512


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(BITS)


@pytest.fixture(scope="module")
def other_keys():
    return generate_keypair(BITS)


def _encrypt(keys, values, layout, quantizer, *, server_round=1, sender="c0", use_private=True, pool=None):
    public, private = keys
    return encrypt_vector(
        values, public_key=public, layout=layout, quantizer=quantizer, server_round=server_round, sender=sender,
        private_key=private if use_private else None, pool=pool,
    )


def test_hand_worked_weighted_sum(keys):
    # Prepare: step = 2 * 1.5 / 15 = 0.2, so these values sit on the grid exactly.
    quantizer = Quantizer(bound=1.5, bits=4)
    layout = SlotLayout(bits=4, max_clients=2, max_weight=2, key_bits=BITS)
    a = np.array([0.1, -0.5, 1.5, -1.5])  # codes 8, 5, 15, 0
    b = np.array([0.3, 0.5, -0.1, 0.1])  # codes 9, 10, 7, 8
    assert layout.headroom == 2 and layout.slot_bits == 6 and layout.slots == 85
    assert quantizer.encode(a).tolist() == [8, 5, 15, 0]
    # Execute: a with weight 1 (phe's public path), b with weight 2 (CRT path)
    ea = _encrypt(keys, a, layout, quantizer, sender="a", use_private=False)
    eb = _encrypt(keys, b, layout, quantizer, sender="b")
    total, weight = decrypt_aggregate(add_encrypted([ea, eb], keys[0], weights=[1, 2]), keys[1])
    # Assert: codes 26, 25, 29, 16 -> 0.2 * code - 1.5 * 3
    assert weight == 3
    np.testing.assert_allclose(total, [0.7, 0.5, 1.3, -1.3], atol=1e-12)


def test_random_5k_vector_within_quantisation_bound(keys):
    rng = np.random.default_rng(0)
    quantizer = Quantizer(bound=1.0, bits=16)
    layout = SlotLayout(bits=16, max_clients=10, max_weight=8, key_bits=BITS)
    updates = [rng.normal(0, 0.4, 5000) for _ in range(5)]
    weights = [int(w) for w in rng.integers(1, 9, 5)]
    messages = [_encrypt(keys, u, layout, quantizer, sender=f"c{i}") for i, u in enumerate(updates)]

    total, weight = decrypt_aggregate(add_encrypted(messages, keys[0], weights=weights), keys[1], min_contributors=5)

    expected = sum(w * np.clip(u, -1, 1) for w, u in zip(weights, updates))
    assert weight == sum(weights)
    assert np.max(np.abs(total - expected)) <= quantizer.error_bound(weight) + 1e-9


def test_stochastic_rounding_bound_and_l2_clip():
    quantizer = Quantizer(bound=1.0, bits=8, clip_norm=1.0, stochastic=True)
    x = np.full(100, 0.5)  # norm 5 -> scaled to 0.1 each
    codes = quantizer.encode(x, np.random.default_rng(1))
    decoded = quantizer.decode_sum(codes, 1)
    assert np.max(np.abs(decoded - 0.1)) < quantizer.error_bound(1)


def test_worst_case_max_clients_does_not_overflow_and_one_more_is_refused(keys):
    quantizer = Quantizer(bound=1.0, bits=8)
    layout = SlotLayout(bits=8, max_clients=4, max_weight=3, key_bits=BITS)
    assert layout.slot_bits == 8 + 4  # ceil(log2(12)) = 4
    top = np.ones(3 * layout.slots + 5)  # every slot of every ciphertext at 255
    messages = [_encrypt(keys, top, layout, quantizer, sender=f"c{i}") for i in range(5)]

    total, weight = decrypt_aggregate(add_encrypted(messages[:4], keys[0], weights=[3] * 4), keys[1])

    assert weight == 12
    np.testing.assert_allclose(total, 12.0, atol=1e-9)  # no carry from one slot into the next
    with pytest.raises(LayoutError, match="exceeds the layout"):
        add_encrypted(messages, keys[0], weights=[3] * 5)
    with pytest.raises(LayoutError, match="max_weight"):
        add_encrypted(messages[:2], keys[0], weights=[4, 1])


def test_layout_that_cannot_hold_a_slot_is_an_error():
    with pytest.raises(LayoutError, match="cannot hold"):
        SlotLayout(bits=32, max_clients=1000, key_bits=32)
    with pytest.raises(LayoutError, match="exceeds 62"):
        SlotLayout(bits=32, max_clients=2**31 + 1)


def test_pack_unpack_roundtrip():
    layout = SlotLayout(bits=10, max_clients=3, key_bits=BITS)
    codes = np.random.default_rng(2).integers(0, 2**layout.slot_bits, 200)
    assert unpack(pack(codes, layout), 200, layout).tolist() == codes.tolist()


def test_dropped_client_leaves_the_sum_of_the_rest(keys):
    quantizer = Quantizer(bound=2.0, bits=12)
    layout = SlotLayout(bits=12, max_clients=4, key_bits=BITS)
    updates = [np.random.default_rng(i).uniform(-2, 2, 300) for i in range(4)]
    sent = [_encrypt(keys, u, layout, quantizer, sender=f"c{i}") for i, u in enumerate(updates) if i != 2]

    total, weight = decrypt_aggregate(add_encrypted(sent, keys[0]), keys[1])

    assert weight == 3
    expected = updates[0] + updates[1] + updates[3]
    assert np.max(np.abs(total - expected)) <= quantizer.error_bound(3) + 1e-9


def test_pool_obfuscators_are_used_once(keys):
    public, private = keys
    quantizer = Quantizer(bits=16)
    layout = SlotLayout(bits=16, max_clients=2, key_bits=BITS)
    pool = ObfuscatorPool(public)
    assert pool.fill(5, private_key=private) == 5
    msg = _encrypt(keys, np.linspace(-1, 1, 40), layout, quantizer, pool=pool)  # 30 slots each: 2
    assert len(pool) == 3
    total, _ = decrypt_aggregate(add_encrypted([msg], public), private)
    assert np.max(np.abs(total - np.linspace(-1, 1, 40))) <= quantizer.error_bound(1) + 1e-12


@pytest.fixture
def wire(keys):
    layout = SlotLayout(bits=16, max_clients=3, key_bits=BITS)
    msg = _encrypt(keys, np.linspace(-1, 1, 100), layout, Quantizer(bits=16), server_round=2)
    return msg, msg.to_bytes(keys[0]), layout


def test_wire_roundtrip_as_ndarray(keys, wire):
    msg, _, layout = wire
    back = EncryptedVector.from_bytes(
        msg.to_ndarray(keys[0]), keys[0], expected_round=2, expected_num_values=100, expected_layout=layout,
        replay_guard=ReplayGuard(),
    )
    assert back == msg


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda b: b[:-40] + bytes([b[-40] ^ 1]) + b[-39:], "digest"),  # a changed ciphertext byte
        (lambda b: b[:-33], "digest"),  # truncated
        (lambda b: b"XXXXX" + b[5:], "malformed"),
    ],
)
def test_changed_bytes_are_refused(keys, wire, tamper, reason):
    _, blob, _ = wire
    with pytest.raises(CiphertextRejected) as err:
        EncryptedVector.from_bytes(tamper(blob), keys[0])
    assert err.value.reason == reason


def test_wrong_length_other_key_stale_round_replay_and_range_are_refused(keys, other_keys, wire):
    msg, blob, layout = wire
    short = EncryptedVector(**{**msg.__dict__, "ciphertexts": msg.ciphertexts[:-1]}).to_bytes(keys[0])
    bad_value = EncryptedVector(**{**msg.__dict__, "ciphertexts": [0] + msg.ciphertexts[1:]}).to_bytes(keys[0])
    foreign = _encrypt(other_keys, np.zeros(100), layout, Quantizer(bits=16), server_round=2).to_bytes(other_keys[0])
    cases = [
        (short, {}, "wrong_length"),
        (blob, {"expected_num_values": 99}, "wrong_length"),
        (foreign, {}, "wrong_key"),
        (blob, {"expected_round": 3}, "stale_round"),
        (blob, {"expected_layout": SlotLayout(bits=16, max_clients=4, key_bits=BITS)}, "wrong_layout"),
        (bad_value, {}, "out_of_range"),
    ]
    for data, kwargs, reason in cases:
        with pytest.raises(CiphertextRejected) as err:
            EncryptedVector.from_bytes(data, keys[0], **kwargs)
        assert err.value.reason == reason, (reason, err.value)
    guard = ReplayGuard()
    EncryptedVector.from_bytes(blob, keys[0], replay_guard=guard)
    with pytest.raises(CiphertextRejected) as err:
        EncryptedVector.from_bytes(blob, keys[0], replay_guard=guard)
    assert err.value.reason == "replay"


def test_decryptor_refuses_other_key_and_single_contributor(keys, other_keys, wire):
    msg, _, _ = wire
    with pytest.raises(CiphertextRejected) as err:
        decrypt_aggregate(msg, other_keys[1])
    assert err.value.reason == "wrong_key"
    with pytest.raises(CiphertextRejected) as err:
        decrypt_aggregate(add_encrypted([msg], keys[0]), keys[1], min_contributors=2)
    assert err.value.reason == "too_few_contributors"


def test_key_files_repr_and_server_side_objects(keys, tmp_path):
    public, private = keys
    save_keypair(tmp_path / "server", public)
    save_keypair(tmp_path / "client", public, private)

    assert load_public_key(tmp_path / "server") == public
    assert not (tmp_path / "server" / "paillier_private.json").exists()
    assert load_private_key(tmp_path / "client").to_dict() == private.to_dict()
    assert stat.S_IMODE((tmp_path / "client" / "paillier_private.json").stat().st_mode) == 0o600
    secrets_ = [str(int(public.n)), format(int(public.n), "x")[:20], format(int(private._p), "x")[:20]]
    for text in (repr(public), repr(private), repr(ObfuscatorPool(public))):
        assert public.key_id in text and not any(s in text for s in secrets_)
    assert_no_private_key({"key": public, "pool": [ObfuscatorPool(public)]})
    with pytest.raises(AssertionError, match="private key"):
        assert_no_private_key({"nested": [object(), {"k": private}]})
    with pytest.raises(AssertionError, match="private key"):
        assert_no_private_key(private.phe)


def test_distributed_noise_std():
    assert distributed_noise_std(2.0, 4) == pytest.approx(1.0)
