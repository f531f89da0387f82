"""Threshold Paillier with signed contributions, attacked the way issue "privacy integrity" attacked it.

Threat models (docs/privacy.md): an honest-but-curious or malicious server that
holds the public key and sees every message; a server colluding with up to
``t - 1`` clients (their key shares, their signing keys); a malicious client
that writes whatever header it likes. Each test plays one adversary against
the real client-side functions and asserts that it is refused or learns nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedapp.crypto import CiphertextRejected, SlotLayout, add_encrypted
from fedapp.crypto.contributions import DecryptionMemory, sign_contribution
from fedapp.crypto.dealing import Party, deal_federation, load_party
from fedapp.crypto.protocol import (
    SecAggSettings,
    combine_threshold,
    decode_partials,
    encrypt_update,
    settings_for,
    threshold_partial_decrypt,
)
from fedapp.crypto.threshold import combine_partials, load_threshold_params
from fedapp.crypto.vectors import EncryptedVector

BITS = 512
CLIENTS = 4
RUN = 7
ROUND = 3


class _SecAgg:  # the fields settings_for reads
    bits, bound, clip_norm, stochastic, max_weight, min_contributors, noise_sigma_total = 16, 1.0, 0.0, False, 1, 3, 0.0
    key_bits = BITS


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Party], SecAggSettings]:
    key_dir = tmp_path_factory.mktemp("keys")
    deal_federation(key_dir, num_clients=CLIENTS, threshold=2, min_contributors=3, bits=BITS)
    parties = [load_party(key_dir, pid) for pid in range(CLIENTS)]
    return key_dir, parties, settings_for(_SecAgg, CLIENTS)


def updates(seed: int = 0, size: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, size) for _ in range(CLIENTS)]


def contribution(party: Party, update: np.ndarray, settings: SecAggSettings, *, server_round: int = ROUND,
                 run_id: int = RUN) -> list[np.ndarray]:
    """What an honest client sends: its encrypted update and the signature over it."""
    zero = [np.zeros_like(update)]
    [blob] = encrypt_update(zero, [update], server_round=server_round, sender=party.sender,
                            public_key=party.public_key, settings=settings)
    sig = sign_contribution(party.signing_key, run_id=run_id, server_round=server_round,
                            key_id=party.public_key.key_id, sender=party.sender, blob=blob.tobytes())
    return [blob, sig]


def decrypt_with(parties: list[Party], request: list[np.ndarray], settings: SecAggSettings,
                 memories: dict[str, DecryptionMemory] | None = None) -> dict[int, list[int]]:
    memories = memories if memories is not None else {}
    partials = {}
    for party in parties:
        memory = memories.setdefault(party.sender, DecryptionMemory())
        array = threshold_partial_decrypt(request, share=party.share, policy=party.policy, memory=memory,
                                          run_id=RUN, server_round=ROUND, settings=settings)
        partials[party.share.index] = decode_partials(array, party.public_key, len(array) // party.public_key.ciphertext_bytes)
    return partials


def test_honest_sum_of_signed_updates_decrypts_with_any_t_shares(federation) -> None:
    # Prepare: three honest clients' signed contributions
    key_dir, parties, settings = federation
    values = updates()
    request = [a for pid in range(3) for a in contribution(parties[pid], values[pid], settings)]
    messages = [EncryptedVector.from_bytes(request[i], parties[0].public_key) for i in (0, 2, 4)]
    aggregate = add_encrypted(messages, parties[0].public_key)

    # Execute: decryptors 1 and 3 (one of them not a contributor) check, sum and partially decrypt
    partials = decrypt_with([parties[1], parties[3]], request, settings)
    total = combine_threshold(partials, aggregate, public_key=parties[0].public_key,
                              params=load_threshold_params(key_dir), settings=settings)

    # Assert: the sum of the three updates, to the fixed point's error bound
    np.testing.assert_allclose(total, values[0] + values[1] + values[2], atol=3 * settings.quantizer.step)


def test_malicious_client_inflating_its_contributor_list_is_refused(federation) -> None:
    # Adversary: client 0 sends one ciphertext whose header claims 9 invented contributors, as an "aggregate"
    _, parties, settings = federation
    values = updates()
    blob, _ = contribution(parties[0], values[0], settings)
    forged = EncryptedVector.from_bytes(blob, parties[0].public_key)
    forged.kind, forged.contributors = "aggregate", [f"ghost-{i}" for i in range(9)]
    forged_blob = forged.to_ndarray(parties[0].public_key)
    forged_sig = sign_contribution(parties[0].signing_key, run_id=RUN, server_round=ROUND,
                                   key_id=parties[0].public_key.key_id, sender="0", blob=forged_blob.tobytes())
    honest = contribution(parties[1], values[1], settings)

    # Execute / Assert: a decryptor refuses the padded sum; the header's contributor list counts for nothing
    with pytest.raises(CiphertextRejected, match="not_an_update"):
        decrypt_with([parties[2]], [forged_blob, forged_sig, *honest], settings)
    # ... and the same client cannot stand in for others: two copies of its update are one contributor
    with pytest.raises(CiphertextRejected, match="duplicate_sender"):
        decrypt_with([parties[2]], [*contribution(parties[0], values[0], settings),
                                    *contribution(parties[0], values[0], settings), *honest], settings)


def test_server_relabelling_one_ciphertext_as_a_sum_is_refused(federation) -> None:
    # Adversary: the server sends client 0's single update (or it plus one more) for decryption
    _, parties, settings = federation
    values = updates()
    single = contribution(parties[0], values[0], settings)
    relabelled = EncryptedVector.from_bytes(single[0], parties[0].public_key)
    relabelled.kind, relabelled.contributors, relabelled.sender = "aggregate", ["0", "1", "2"], "server"

    with pytest.raises(CiphertextRejected, match="too_few_contributors"):
        decrypt_with([parties[1]], single, settings)
    with pytest.raises(CiphertextRejected, match="too_few_contributors"):
        decrypt_with([parties[1]], [*single, *contribution(parties[2], values[2], settings)], settings)
    # the relabelled blob carries no valid signature of any client (the server cannot sign for them)
    with pytest.raises(CiphertextRejected):
        decrypt_with([parties[1]], [relabelled.to_ndarray(parties[0].public_key), single[1],
                                    *contribution(parties[1], values[1], settings),
                                    *contribution(parties[2], values[2], settings)], settings)


def test_server_cannot_sign_for_clients_or_replay_another_round_or_run(federation) -> None:
    _, parties, settings = federation
    values = updates()
    honest = [a for pid in (1, 2) for a in contribution(parties[pid], values[pid], settings)]
    blob, _ = contribution(parties[0], values[0], settings)
    other_round = contribution(parties[0], values[0], settings, server_round=ROUND - 1)
    other_run = contribution(parties[0], values[0], settings, run_id=RUN + 1)

    with pytest.raises(CiphertextRejected, match="bad_signature"):  # a signature by someone else's key
        decrypt_with([parties[3]], [blob, honest[1], *honest], settings)
    with pytest.raises(CiphertextRejected, match="stale_round"):
        decrypt_with([parties[3]], [*other_round, *honest], settings)
    with pytest.raises(CiphertextRejected, match="bad_signature"):
        decrypt_with([parties[3]], [*other_run, *honest], settings)


def test_server_differencing_two_overlapping_sums_in_one_round_is_refused(federation) -> None:
    # Adversary: sums of {0,1,2} and {1,2,3} from the same decryptors, hoping to difference out client 0 vs 3
    _, parties, settings = federation
    values = updates()
    signed = {pid: contribution(parties[pid], values[pid], settings) for pid in range(CLIENTS)}
    memories: dict[str, DecryptionMemory] = {}
    decryptors = [parties[1], parties[2]]
    first = [a for pid in (0, 1, 2) for a in signed[pid]]
    decrypt_with(decryptors, first, settings, memories)

    # a retry of the same set is answered; a different set in the same round is not
    decrypt_with(decryptors, first, settings, memories)
    with pytest.raises(CiphertextRejected, match="second_sum"):
        decrypt_with(decryptors, [a for pid in (1, 2, 3) for a in signed[pid]], settings, memories)


def test_server_plus_one_client_cannot_decrypt_a_single_update(federation) -> None:
    # Adversary: the server (every ciphertext) plus client 1 (its share, t = 2) against client 0's update
    _, parties, settings = federation
    values = updates()
    blob, _ = contribution(parties[0], values[0], settings)
    target = EncryptedVector.from_bytes(blob, parties[0].public_key)
    colluder = parties[1].share
    own_partial = colluder.partial_decrypt(target.ciphertexts)

    # the combination refuses one partial, and every way of using it as if it were enough gives garbage
    with pytest.raises(ValueError):
        combine_partials({colluder.index: own_partial}, parties[0].public_key, threshold=2, num_parties=CLIENTS)
    n = int(parties[0].public_key.n)
    layout: SlotLayout = settings.layout
    honest_plaintext_bound = 1 << (layout.slots * layout.slot_bits)
    for exponent_guess in (1, 2, 4 * 24 ** 2):  # L(c_i^k) / k for the plausible k
        guesses = [((int(p) - 1) // n) * pow(exponent_guess, -1, n) % n for p in own_partial]
        assert any(g >= honest_plaintext_bound for g in guesses)


def test_client_signs_one_contribution_per_round_so_two_sums_cannot_differ_in_it(tmp_path: Path) -> None:
    # Adversary: the server asks client 0 twice in one round (then has disjoint decryptor pairs decrypt two sums
    # that differ only in client 0's update); found by the privacy-attacks benchmark
    from flwr.common import RecordDict

    from fedapp.client_app import FedappClient
    from fedapp.components import new_model
    from fedapp.config import ExperimentConfig
    from fedapp.crypto import load_public_key
    from fedapp.crypto.protocol import MODE_ENCRYPT, SECAGG_KEY_ID, SECAGG_MODE, SECAGG_ROUND
    from fedapp.training import get_weights

    deal_federation(tmp_path / "keys", num_clients=3, threshold=2, min_contributors=3, bits=BITS)
    cfg = ExperimentConfig.from_dict({
        "dataset": {"name": "synthetic-mnist", "synthetic_train_size": 300, "synthetic_test_size": 60},
        "partition": {"num_clients": 3}, "model": {"name": "cnn_mnist_small"},
        "client": {"batch_size": 20, "momentum": 0.0},
        "secagg": {"method": "paillier", "key_dir": str(tmp_path / "keys"), "key_bits": BITS, "min_contributors": 3},
        "privacy": {"client": {"enabled": True, "mode": "distributed", "sample_rate": 0.2, "noise_multiplier": 1.0,
                               "ledger_dir": str(tmp_path / "ledgers")}},
    })
    state, weights = RecordDict(), get_weights(new_model(cfg))
    key_id = load_public_key(tmp_path / "keys").key_id

    def ask(server_round: int) -> list[np.ndarray]:
        config = {"server_round": server_round, SECAGG_MODE: MODE_ENCRYPT, SECAGG_ROUND: server_round, SECAGG_KEY_ID: key_id}
        return FedappClient(cfg, 0, state, run_id=RUN).fit(weights, config)[0]

    first = ask(1)
    assert len(first) == 2  # ciphertext and signature
    steps_booked = FedappClient(cfg, 0, state, run_id=RUN).load_ledger("rdp").steps
    for again in (1, 0):
        with pytest.raises(CiphertextRejected, match="second_contribution"):
            ask(again)
    assert FedappClient(cfg, 0, state, run_id=RUN).load_ledger("rdp").steps == steps_booked  # refused before training
    assert len(ask(2)) == 2


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"server_round": 1}, "refusing to train without encrypting"),
        ({"server_round": 1, "secagg.mode": "plain", "secagg.round": 1}, "refusing to train without encrypting"),
        ({"server_round": 9, "secagg.mode": "encrypt", "secagg.round": 1}, "differs from the signed round"),
    ],
)
def test_paillier_client_never_trains_in_the_clear_or_for_another_round_than_it_signs(config: dict, reason: str) -> None:
    # Adversary: a server that omits the encryption instruction (the update would leave in the clear), or sends one
    # client server_round=1 and the others 5000 (with lr decay the others' updates and noise shares become 0)
    from fedapp.client_app import check_encrypt_instruction

    with pytest.raises(ValueError, match=reason):
        check_encrypt_instruction(config)
    check_encrypt_instruction({"server_round": 3, "secagg.mode": "encrypt", "secagg.round": 3})  # honest: passes


def test_policy_refuses_m_at_most_t(tmp_path: Path) -> None:
    # Adversary: t - 1 colluders sign zero updates; with m <= t a "sum of m" would hold one honest update
    with pytest.raises(ValueError, match="threshold \\+ 1"):
        deal_federation(tmp_path / "k", num_clients=4, threshold=2, min_contributors=2, bits=BITS)


def test_node_config_pins_the_privacy_mode_key_dir_and_forbids_simulated_attacks(tmp_path: Path) -> None:
    # Adversary: under flwr run the server writes the run config: it switches the privacy mode off, points the
    # key folder elsewhere, or makes every other client a "simulated attacker" that sends nothing
    from fedapp.config import ConfigError, ExperimentConfig
    from fedapp.node_policy import pin_to_node

    dp = ExperimentConfig.from_dict({"client": {"momentum": 0.0},
                                     "secagg": {"method": "paillier", "key_dir": "/server/chosen"},
                                     "privacy": {"client": {"enabled": True, "mode": "distributed", "sample_rate": 0.1,
                                                            "noise_multiplier": 1.0}}})
    node = {"privacy-mode": "client_dp_distributed", "secagg-key-dir": "/node/keys", "ledger-dir": "/node/ledgers"}

    pinned = pin_to_node(dp, node)
    assert pinned.secagg.key_dir == "/node/keys" and pinned.privacy.client.ledger_dir == "/node/ledgers"
    with pytest.raises(ConfigError, match="pinned to 'client_dp_distributed'"):
        pin_to_node(ExperimentConfig(), node)  # plain mode: refused
    attacked = ExperimentConfig.from_dict({**dp.to_dict(), "attack": {"name": "gaussian", "clients": "0"}})
    with pytest.raises(ConfigError, match="simulated attacker"):
        pin_to_node(attacked, node)
    assert pin_to_node(attacked, {**node, "simulated-attacks": "allow"}).attack.name == "gaussian"


def test_secaggplus_client_refuses_an_unmask_request_naming_a_node_alive_and_dropped() -> None:
    # Adversary (malicious SecAgg+ server): lists node 2 as active AND dead, to collect both its mask-seed share and
    # its secret-key share from honest neighbours and strip every mask from node 2's vector
    import time

    from flwr.app.message.message import make_message
    from flwr.common import ConfigRecord, MessageType, Metadata, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from fedapp.client_app import check_unmask_request

    def unmask(active: list[int], dead: list[int]):
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})})
        metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                            group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
        return make_message(metadata, content)

    with pytest.raises(ValueError, match="both active and dropped"):
        check_unmask_request(unmask([1, 2, 3], [2]))
    with pytest.raises(ValueError, match="both active and dropped"):
        check_unmask_request(unmask([2, 3], [1]))  # this node itself reported as dropped
    check_unmask_request(unmask([1, 3], [2]))  # an honest dropout report passes
