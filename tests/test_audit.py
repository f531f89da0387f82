"""The audit log: an operator-side adversary edits, deletes, inserts, reorders, cuts and re-signs; each is caught."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedapp.store.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    SignedHead,
    entry_hash,
    generate_audit_key,
    head_message,
    head_path,
    load_public_key,
    load_signing_key,
    verify_log,
)

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "tamper.py"
spec = importlib.util.spec_from_file_location("tamper", SCRIPT)
tamper = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tamper
spec.loader.exec_module(tamper)

RUN = "run-1"
OPERATOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ATTACKER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def write_log(path: Path, entries: int = 10) -> AuditLog:
    """A signed log of ``entries`` entries: entry k is a privacy spend of epsilon k / 10 (entry 1: run_start)."""
    log = AuditLog(path, run_id=RUN, signing_key=OPERATOR)
    log.append("run_start", num_rounds=entries)
    log.extend(("privacy_spend", k, {"client": f"c{k % 3}", "epsilon": k / 10}) for k in range(2, entries + 1))
    log.sign_head()
    return log


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def edited(line: str, **changes: object) -> str:
    entry = json.loads(line)
    entry["fields"].update(changes)
    return json.dumps(entry) + "\n"


def rehash_from(lines: list[str], start: int) -> list[str]:
    """Lines with entry ``start`` (1-based) and every later one re-hashed and re-linked."""
    out = list(lines)
    prev = json.loads(out[start - 2])["hash"] if start > 1 else GENESIS
    for j in range(start - 1, len(out)):
        entry = json.loads(out[j])
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)
        out[j] = json.dumps(entry) + "\n"
    return out


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, tuple[int, str]]:
    """A 10-entry signed log and its head as the store records it."""
    log = write_log(tmp_path / "audit.jsonl")
    return log.path, (log.seq, log.head)


def verify(path: Path, head: tuple[int, str] | None = None, **kwargs: object):
    return verify_log(path, expected_head=head, public_key=OPERATOR.public_key(), **kwargs)


# --------------------------------------------------------------------------- intact logs


def test_intact_log_verifies_signed_against_the_pinned_key(signed) -> None:
    path, head = signed

    report = verify(path, head, run_id=RUN)

    assert report.ok and report.signed
    assert (report.entries, report.covered, report.first_bad, report.problem, report.note) == (10, 10, None, "", "")
    assert report.head == head[1]
    assert report.line().startswith("audit log OK: 10 entries")


def test_entries_chain_from_genesis_and_hash_their_canonical_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", run_id=RUN)

    first, second = log.extend([("run_start", None, {}), ("aggregation", 1, {"model_digest": "ab"})])

    assert (first.seq, first.prev, second.seq, second.prev) == (1, GENESIS, 2, first.hash)
    assert second.hash == entry_hash(json.loads(lines_of(log.path)[1]))
    assert (log.seq, log.head) == (2, second.hash)


def test_unrecorded_tail_is_accepted_and_named(signed) -> None:
    path, head = signed
    log = AuditLog(path, run_id=RUN)  # the process dies after appending, before recording the head
    log.append("aggregation", 5, model_digest="ff")

    report = verify(path, head)

    assert report.ok and report.covered == 10 and report.entries == 11
    assert "unrecorded tail: entries 11..11" in report.note


def test_without_any_recorded_head_the_report_says_so(signed) -> None:
    path, _ = signed
    head_path(path).unlink()

    report = verify_log(path)

    assert report.ok and not report.signed and report.covered == 0
    assert "no recorded head" in report.note


# --------------------------------------------------------------------------- tampering with entries


def test_edited_entry_is_named(signed) -> None:
    path, head = signed
    lines = lines_of(path)
    lines[6] = edited(lines[6], epsilon=0.1)  # entry 7: epsilon 0.7 -> 0.1, old hash kept
    rewrite(path, lines)

    report = verify(path, head)

    assert not report.ok and report.first_bad == 7
    assert "entry 7 was edited" in report.problem
    assert report.line().startswith("audit log TAMPERED at entry 7")


def test_edit_rehashed_to_the_end_is_caught_by_the_recorded_head(signed) -> None:
    path, head = signed
    lines = lines_of(path)
    lines[6] = edited(lines[6], epsilon=0.1)
    rewrite(path, rehash_from(lines, 7))

    report = verify(path, head)

    # Every hash from entry 1 on could have changed: no head vouches for a prefix.
    assert not report.ok and report.first_bad == 1
    assert "rewritten" in report.problem


def test_more_recorded_heads_narrow_a_rehashed_edit_down(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", run_id=RUN)
    heads = []
    for rnd in range(1, 5):  # four rounds of three entries, the head recorded after each
        log.extend([("aggregation", rnd, {"model_digest": str(rnd)}), ("privacy_spend", rnd, {"epsilon": rnd}),
                    ("checkpoint", rnd, {"path": f"r{rnd}"})])  # fmt: skip
        heads.append((log.seq, log.head))
    lines = lines_of(log.path)
    lines[7] = edited(lines[7], epsilon=0)  # entry 8, in round 3 (entries 7..9)
    rewrite(log.path, rehash_from(lines, 8))

    report = verify_log(log.path, expected_head=heads)

    assert not report.ok and report.first_bad == 7 and report.covered == 6
    assert "entries 7..9 were rewritten" in report.problem


def test_entry_rehashed_alone_is_named_not_its_successor(signed) -> None:
    path, head = signed
    lines = lines_of(path)
    lines[6] = edited(lines[6], epsilon=0.1)
    entry = json.loads(lines[6])
    entry["hash"] = entry_hash(entry)
    lines[6] = json.dumps(entry) + "\n"
    rewrite(path, lines)

    report = verify(path, head)

    assert not report.ok and report.first_bad == 7
    assert "entry 7 was rewritten" in report.problem


@pytest.mark.parametrize(("deleted", "first_bad"), [(1, 1), (5, 5), (10, 10)])
def test_deleted_entry_is_named(signed, deleted: int, first_bad: int) -> None:
    path, head = signed
    lines = lines_of(path)
    del lines[deleted - 1]
    rewrite(path, lines)

    report = verify(path, head)

    assert not report.ok and report.first_bad == first_bad


def test_deleting_the_last_entry_reads_as_truncation(signed) -> None:
    path, head = signed
    rewrite(path, lines_of(path)[:-1])

    report = verify(path, head)

    assert report.problem.startswith("truncated: the log ends at entry 9 but the recorded head")


def test_inserted_forgery_is_named(signed) -> None:
    path, head = signed
    lines = lines_of(path)
    before = json.loads(lines[3])  # forge entry 5, linked to entry 4, with a valid hash
    forged = {"seq": 5, "time": before["time"], "run_id": RUN, "kind": "client_released", "round": 4,
              "fields": {"client": "c1"}, "prev": before["hash"]}  # fmt: skip
    forged["hash"] = entry_hash(forged)
    lines.insert(4, json.dumps(forged) + "\n")
    rewrite(path, lines)

    report = verify(path, head)

    assert not report.ok and report.first_bad == 5
    assert "entry 5 was inserted" in report.problem


def test_reordered_entries_are_named(signed) -> None:
    path, head = signed
    lines = lines_of(path)
    lines[2], lines[7] = lines[7], lines[2]  # entries 3 and 8 swapped
    rewrite(path, lines)

    report = verify(path, head)

    assert not report.ok and report.first_bad == 3


def test_truncated_tail_is_caught_by_the_recorded_head(signed) -> None:
    path, head = signed
    rewrite(path, lines_of(path)[:6])

    report = verify(path, head)

    assert not report.ok and report.first_bad == 7
    assert report.problem == "truncated: the log ends at entry 6 but the recorded head (recorded) is entry 10"


def test_truncated_tail_is_caught_by_the_signed_head_alone(signed) -> None:
    path, _ = signed
    rewrite(path, lines_of(path)[:6])

    report = verify(path)  # no head from the store: the signed head file still knows entry 10

    assert not report.ok and report.first_bad == 7 and "signed head" in report.problem


def test_torn_last_line_is_reported(signed) -> None:
    path, head = signed
    path.write_bytes(path.read_bytes()[:-20])

    report = verify(path, head)

    assert not report.ok and report.first_bad == 10 and "torn write" in report.problem


# --------------------------------------------------------------------------- tampering with the head


def test_head_signed_with_another_key_is_rejected(signed) -> None:
    path, head = signed
    other = AuditLog(path.with_name("b.jsonl"), run_id=RUN, signing_key=ATTACKER)
    other.extend([("run_start", None, {})])
    other.sign_head()

    report = verify(path, head, head_file=head_path(other.path))

    assert not report.ok and not report.signed
    assert "not the pinned key" in report.problem


def test_forged_head_over_a_rewritten_chain_is_rejected_when_the_key_is_pinned(signed) -> None:
    path, _ = signed
    lines = lines_of(path)
    lines[6] = edited(lines[6], epsilon=0.1)
    rewrite(path, rehash_from(lines, 7))
    new_head = json.loads(lines_of(path)[-1])["hash"]
    forged = SignedHead(RUN, 10, new_head, ATTACKER.sign(head_message(RUN, 10, new_head)).hex(),
                        ATTACKER.public_key().public_bytes_raw().hex(), 0.0)  # fmt: skip
    head_path(path).write_text(json.dumps(forged.to_dict()))

    pinned = verify(path)
    unpinned = verify_log(path)

    assert not pinned.ok and "not the pinned key" in pinned.problem
    # Without the pinned key the forgery is self-consistent: the report must not call it signed.
    assert unpinned.ok and not unpinned.signed and "key not pinned" in unpinned.note


def test_head_file_with_a_changed_seq_fails_its_signature(signed) -> None:
    path, head = signed
    data = json.loads(head_path(path).read_text())
    data["seq"] = 6
    head_path(path).write_text(json.dumps(data))

    report = verify(path, head)

    assert not report.ok and report.problem == "the head signature is invalid"


def test_deleted_head_file_is_reported_when_the_key_is_pinned(signed) -> None:
    path, head = signed
    head_path(path).unlink()

    report = verify(path, head)

    assert not report.ok and "no signed head" in report.problem


# --------------------------------------------------------------------------- reopening (resume)


def test_reopened_log_continues_the_chain(signed) -> None:
    path, (seq, head) = signed

    log = AuditLog(path, run_id=RUN, signing_key=OPERATOR, expected_head=(seq, head))
    entry = log.append("resume", 4, interrupted_rounds=[5])
    log.sign_head()

    assert (entry.seq, entry.prev) == (11, head)
    report = verify(path, [(seq, head), (log.seq, log.head)])
    assert report.ok and report.signed and report.covered == 11


def test_reopening_a_tampered_log_is_refused(signed) -> None:
    path, _ = signed
    lines = lines_of(path)
    lines[3] = edited(lines[3], epsilon=9)
    rewrite(path, lines)

    with pytest.raises(AuditError, match="entry 4 was edited"):
        AuditLog(path, run_id=RUN)


def test_reopening_a_log_cut_below_its_signed_head_is_refused(signed) -> None:
    path, _ = signed
    rewrite(path, lines_of(path)[:8])

    with pytest.raises(AuditError, match="truncated: the log ends at entry 8"):
        AuditLog(path, run_id=RUN)


def test_reopening_with_a_torn_last_line_is_refused(signed) -> None:
    path, _ = signed
    with path.open("a") as f:
        f.write('{"seq": 11, "time": 1.0, "run_')

    with pytest.raises(AuditError, match="line 11 is incomplete"):
        AuditLog(path, run_id=RUN)


def test_reopening_another_runs_log_is_refused(signed) -> None:
    path, _ = signed

    with pytest.raises(AuditError, match="belongs to run 'run-1', not 'run-2'"):
        AuditLog(path, run_id="run-2")


def test_a_file_changed_under_an_open_log_is_not_appended_to(signed) -> None:
    path, _ = signed
    log = AuditLog(path, run_id=RUN)
    rewrite(path, lines_of(path)[:5])

    with pytest.raises(AuditError, match="changed since it was opened"):
        log.append("note", text="hello")


# --------------------------------------------------------------------------- writing


def test_unknown_kind_and_unserialisable_fields_write_nothing(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", run_id=RUN)

    with pytest.raises(ValueError, match="kind must be one of"):
        log.extend([("note", None, {}), ("client_vanished", 1, {})])
    with pytest.raises(ValueError, match="privacy_spend.when is not JSON-serialisable"):
        log.append("privacy_spend", 1, when=object())

    assert log.seq == 0 and log.path.read_bytes() == b""


def test_numpy_scalars_and_infinite_epsilon_are_recorded_as_plain_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", run_id=RUN)

    entry = log.append("privacy_spend", np.int64(2), epsilon=np.float32(0.5), clients=np.arange(2), cap=float("inf"))

    assert entry.round == 2
    assert entry.fields == {"epsilon": 0.5, "clients": [0, 1], "cap": "Infinity"}
    assert verify_log(log.path).ok


def test_sign_head_without_a_key_is_none(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", run_id=RUN)

    assert log.sign_head() is None and not head_path(log.path).exists()


# --------------------------------------------------------------------------- keys


def test_generate_audit_key_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = generate_audit_key(tmp_path / "keys")

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = load_signing_key(private)
    assert load_public_key(public).public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(AuditError, match="already exists"):
        generate_audit_key(tmp_path / "keys")
    generate_audit_key(tmp_path / "keys", overwrite=True)
    assert load_signing_key(private).public_key().public_bytes_raw() != key.public_key().public_bytes_raw()


def test_loading_a_missing_or_wrong_key_file_is_one_clear_error(tmp_path: Path) -> None:
    _, public = generate_audit_key(tmp_path)

    with pytest.raises(AuditError, match="no audit signing key at"):
        load_signing_key(tmp_path / "nope.pem")
    with pytest.raises(AuditError, match="not an unencrypted PEM private key"):
        load_signing_key(public)
    with pytest.raises(AuditError, match="no audit public key"):
        load_public_key(tmp_path / "nope.pub")


# --------------------------------------------------------------------------- the tamper matrix


def test_tamper_matrix_detects_every_trial_and_names_the_entry(tmp_path: Path) -> None:
    result = tamper.tamper_matrix(tmp_path, entries=30, trials_per_kind=3, seed=1)

    assert result["all_detected"]
    assert set(result["kinds"]) == {"edit", "edit_rehash", "delete", "insert", "reorder", "truncate"}
    for counts in result["kinds"].values():
        assert counts["detected"] == counts["first_bad_correct"] == counts["trials"] == 3
        assert counts["detection_rate"] == 1.0
