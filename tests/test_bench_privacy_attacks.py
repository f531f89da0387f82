"""The privacy-attack benchmark's logic, in its quick form: the old release leaks, the new one does not, attacks refused."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "bench_privacy_attacks.py"
spec = importlib.util.spec_from_file_location("bench_privacy_attacks", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up while the class is made
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def membership() -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench.membership(trials=16, pretrain_steps=20, sigma=bench.SIGMA_AT_SETTINGS, seed=0, mc_runs=500,
                                candidates=40)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def protocol() -> dict:
    return bench.protocol_attacks(bits=512, size=20, seed=0)


def test_the_advantage_bound_is_the_corner_of_the_dp_region() -> None:
    eps, delta = 0.5, 1e-5
    bound = bench.advantage_bound(eps, delta)

    assert bound == pytest.approx(math.tanh(eps / 2), abs=1e-4)
    # the corner (FPR = (1 - delta) / (e^eps + 1), TPR = FPR + bound) lies on both edges of the region
    fpr = (1 - delta) / (math.exp(eps) + 1)
    assert bench.within_dp_region(fpr + bound, fpr, eps, delta)
    assert not bench.within_dp_region(fpr + bound + 1e-3, fpr, eps, delta)
    assert not bench.within_dp_region(0.2, 0.0, 5.0, delta)  # never wrong but sometimes right: no finite epsilon


def test_the_subset_table_tells_a_sample_with_the_target_from_one_without() -> None:
    known = bench.PerSample(np.array([0.5, 1.25, 2.0]), np.array([1, 0, 1]), None, np.zeros(3))
    table = bench.SubsetTable(known, target_loss=0.75, target_correct=1)

    assert table.explains(2, 2.5, 2) == (True, False)  # records 0 and 2
    assert table.explains(2, 2.75, 2) == (False, True)  # record 2 and the target (2.0 + 0.75, both correct)
    assert table.explains(2, 2.75, 1) == (False, False)  # nothing explains one correct of those two
    assert table.explains(0, 0.0, 0) == (True, False)
    assert bench.adversary_from_metrics({"epsilon": 1.0}, table) == (bench.ABSTAIN, bench.ABSTAIN)
    assert bench.adversary_from_count(1, 13) == bench.ABSTAIN  # the constant count says nothing


def test_old_release_decides_membership_and_the_new_one_gives_zero_advantage(membership: dict) -> None:
    old, new = membership["old_release"], membership["new_release"]
    bound = membership["bounds"]["per_round"]["advantage_bound"]

    # OLD: the exact count decides every round; the metrics decide most rounds' sampling question, never wrongly
    assert old["from_num_examples"]["game"]["wrong"] == 0
    assert old["from_num_examples"]["advantage"] == 1.0
    sampled = old["from_metrics"]["sampled_question"]
    assert sampled["wrong"] == 0 and sampled["decided"] >= 0.8 * sampled["rounds"]
    assert old["from_metrics"]["fpr"] == 0.0 and not old["from_metrics"]["within_dp_region"]
    # NEW: the released fields are the same in both worlds, so no test can tell them apart
    assert new["identical_all"]
    assert new["from_metrics"]["advantage"] == 0.0 and new["from_num_examples"]["advantage"] == 0.0
    assert 0.0 <= bound < 0.2
    example = membership["release_example"]["new"]
    assert example["num_examples"] == 1
    assert not {"train_loss", "train_accuracy", "dp_batch"} & set(example["metrics"])


def test_the_decrypted_sum_test_sees_the_claimed_noise(membership: dict) -> None:
    test = membership["decrypted_sum_test"]

    assert test["mu"] == pytest.approx(1.0, abs=1e-3)  # the target's gradient is clipped to C
    assert test["analytic_advantage"] == pytest.approx(test["tv_pld_per_round"], rel=1e-3)
    assert test["analytic_advantage"] <= membership["bounds"]["per_round"]["advantage_bound"]
    assert 0.5 * test["noise_std_claimed"] < test["noise_std_measured_out"] < 1.5 * test["noise_std_claimed"]


def test_each_protocol_attack_is_refused(protocol: dict) -> None:
    attacks = protocol["attacks"]

    assert attacks["honest sum (control)"]["new"]["outcome"] == "accepted"
    for name in ("malicious client inflating contributors", "server relabelling one ciphertext as a sum",
                 "server differencing two sums", "server + one client", "forged or replayed signatures",
                 "server asking one client twice in a round"):
        row = attacks[name]["new"]
        assert row["outcome"].startswith("refused"), (name, row)
        assert all(v.startswith("refused") for v in row.get("variants", {}).values()), (name, row)
    assert attacks["server + one client"]["new"]["learns"] == "nothing"
    # the old single key decrypted what it was shown
    for name in ("malicious client inflating contributors", "server relabelling one ciphertext as a sum",
                 "server + one client"):
        assert attacks[name]["old"]["max_abs_error"] < 1e-3


def test_the_verdict_judges_each_figure(membership: dict, protocol: dict) -> None:
    verdict = bench.verdict(membership, protocol)

    for name in ("membership advantage from released metrics (new)", "malicious client inflating contributors",
                 "server + one client", "server differencing two sums", "server relabelling one ciphertext as a sum",
                 "server asking one client twice in a round"):
        assert verdict[name]["met"], (name, verdict[name])
    assert verdict["membership advantage from released metrics (new)"]["old"]["met"] is False
