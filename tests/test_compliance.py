"""The compliance report (fedapp.api.compliance): what it claims must follow from what the store recorded.

Exports are built by hand where one fact is under test, and through a real
SQLite RunStore where the report must read what the store actually writes
(resumed attempts, refusals committed with their events).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fedapp.api.compliance import NOT_PROTECTED, build_report, render_html
from fedapp.config import ExperimentConfig
from fedapp.store import ClientUpdateRecord, EventRecord, RoundRecord, RunRecord, RunStore, config_hash

AUDIT_OK = {"ok": True, "line": "audit log OK: 12 entries", "entries": 12, "signed": False,
            "checked_signature": False, "head": "ab" * 32}
STABLE_KEYS = {
    "report_version", "generated_at", "generated_at_iso", "run", "threat_model", "privacy", "participants",
    "superseded_rounds", "refusals", "operator_actions", "audit", "verdict",
}


# -- builders ---------------------------------------------------------------------


def config(**overrides: Any) -> dict[str, Any]:
    """The default experiment as a dict, with dotted overrides (``privacy__client__enabled=True``)."""
    out = ExperimentConfig().to_dict()
    out["num_rounds"] = 3
    for dotted, value in overrides.items():
        node = out
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def dp_config(**overrides: Any) -> dict[str, Any]:
    defaults = {"privacy__client__enabled": True, "privacy__client__target_epsilon": 3.0,
                "privacy__client__epsilon_budget": 2.0}
    return config(**{**defaults, **overrides})


def rnd(number: int, participants: list[str], attempt: int = 1, start: float | None = None, **metrics: Any) -> dict:
    started = 1000.0 + 100 * number + 1000 * (attempt - 1) if start is None else start
    return {"run_id": "r", "round": number, "attempt": attempt, "metrics": {"round": number, **metrics},
            "started_at": started, "ended_at": started + 50, "participants": participants,
            "bytes_up": 0, "bytes_down": 0}


def upd(number: int, client: str, status: str = "accepted", reason: str = "", epsilon: float | None = None,
        attempt: int = 1) -> dict:
    return {"run_id": "r", "round": number, "attempt": attempt, "client": client, "status": status,
            "reason": reason, "num_examples": 1, "update_norm": 1.0, "anomaly_score": None, "epsilon": epsilon,
            "reputation": None}


def event(number: int, kind: str, reason: str, time: float, **fields: Any) -> dict:
    return {"run_id": "r", "round": number, "kind": kind, "reason": reason, "fields": fields, "time": time}


def export(cfg: dict[str, Any], rounds: Sequence[dict] = (), updates: Sequence[dict] = (),
           events: Sequence[dict] = (), **run: Any) -> dict[str, Any]:
    record = {"run_id": "r", "name": "nightly", "config": cfg, "config_hash": config_hash(cfg),
              "code_version": "0.1.0", "status": "completed", "started_at": 1000.0, "output_dir": "/tmp/r",
              "ended_at": 2000.0, "error": None, "last_round": cfg["num_rounds"], "attempt": 1,
              "audit_head": "ab" * 32, "audit_seq": 12, **run}
    return {"run": record, "rounds": list(rounds), "updates": list(updates), "checkpoints": [],
            "events": list(events)}


def entry(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    found = [t for t in report["threat_model"] if t["mechanism"].startswith(prefix)]
    assert len(found) == 1, [t["mechanism"] for t in report["threat_model"]]
    return found[0]


def client_row(report: dict[str, Any], label: str) -> dict[str, Any]:
    return next(c for c in report["privacy"]["clients"] if c["client"] == label)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore(f"sqlite:///{tmp_path / 'fedapp.db'}", retries=0, timeout_s=2.0) as s:
        yield s


def store_run(store: RunStore, cfg: dict[str, Any], name: str = "stored") -> str:
    store.create_run(RunRecord(run_id="r", name=name, config=cfg, config_hash=config_hash(cfg),
                               code_version="test", status="running", started_at=1000.0, output_dir="/tmp/r"))
    return "r"


def commit(store: RunStore, number: int, attempt: int, clients: dict[str, tuple[str, str]],
           events: Sequence[tuple[str, str, str]] = (), *, epsilon: float | None = None) -> None:
    """Commit round ``number``: ``clients`` label -> (status, reason); ``events`` (kind, client, reason)."""
    start = 1000.0 + 100 * number + 1000 * attempt
    updates = [ClientUpdateRecord("r", number, attempt, c, status, reason, epsilon=epsilon)
               for c, (status, reason) in clients.items()]
    records = [EventRecord("r", number, kind, reason, {"client": c}, start + 10) for kind, c, reason in events]
    accepted = sorted(c for c, (status, _) in clients.items() if status == "accepted")
    round_ = RoundRecord("r", number, attempt, {"round": number, "fit_sampled": len(clients),
                                                "fit_trained": len(accepted), "fit_failures": 0},
                         start, start + 50, accepted)
    store.commit_round("r", round_, updates, records, None, audit_head="cd" * 32, audit_seq=number)


# -- privacy budget ---------------------------------------------------------------


def test_a_client_over_its_budget_fails_the_budget_verdict() -> None:
    cfg = dp_config()
    updates = [upd(1, "0", epsilon=1.0), upd(2, "0", epsilon=1.9), upd(1, "1", epsilon=1.5), upd(2, "1", epsilon=2.4)]
    report = build_report(export(cfg, [rnd(1, ["0", "1"]), rnd(2, ["0", "1"])], updates), audit=AUDIT_OK)

    over, fine = client_row(report, "1"), client_row(report, "0")
    assert (over["epsilon_spent"], over["budget"], over["within_budget"]) == (2.4, 2.0, False)
    assert over["left"] == pytest.approx(-0.4)
    assert (fine["epsilon_spent"], fine["within_budget"], fine["rounds_trained"]) == (1.9, True, 2)
    assert report["privacy"]["max_client_epsilon"] == 2.4
    assert report["privacy"]["all_within_budget"] is False
    assert report["verdict"]["within_budget"] is False
    assert report["verdict"]["summary"].startswith("ATTENTION")
    assert "1 client(s) over the epsilon budget: 1" in report["verdict"]["summary"]


def test_spend_of_an_abandoned_attempt_still_counts() -> None:
    """A ledger is cumulative and never refunded: the max over every attempt's updates is the spend."""
    cfg = dp_config()
    rounds = [rnd(1, ["0"]), rnd(2, ["0"]), rnd(2, ["0"], attempt=2)]
    updates = [upd(1, "0", epsilon=1.0), upd(2, "0", epsilon=2.1), upd(2, "0", epsilon=1.8, attempt=2)]
    report = build_report(export(cfg, rounds, updates, attempt=2), audit=AUDIT_OK)

    assert client_row(report, "0")["epsilon_spent"] == 2.1
    assert report["verdict"]["within_budget"] is False


def test_budget_is_epsilon_budget_else_target_else_none() -> None:
    rounds, updates = [rnd(1, ["0"])], [upd(1, "0", epsilon=2.5)]
    by_target = build_report(export(dp_config(privacy__client__epsilon_budget=0.0), rounds, updates), audit=AUDIT_OK)
    assert client_row(by_target, "0")["budget"] == 3.0 and client_row(by_target, "0")["within_budget"] is True

    uncapped = config(privacy__client__enabled=True, privacy__client__noise_multiplier=1.1)
    report = build_report(export(uncapped, rounds, updates), audit=AUDIT_OK)
    row = client_row(report, "0")
    assert (row["budget"], row["left"], row["within_budget"], row["note"]) == (None, None, True, "no budget set")


def test_a_dp_client_that_trained_without_reporting_epsilon_is_not_counted_as_within_budget() -> None:
    report = build_report(export(dp_config(), [rnd(1, ["0"])], [upd(1, "0", epsilon=None)]), audit=AUDIT_OK)
    assert client_row(report, "0")["within_budget"] is False
    assert "unverifiable" in client_row(report, "0")["note"]


def test_infinite_epsilon_is_strict_json_and_over_budget() -> None:
    report = build_report(export(dp_config(), [rnd(1, ["0"])], [upd(1, "0", epsilon=float("inf"))]), audit=AUDIT_OK)
    json.dumps(report, allow_nan=False)
    assert client_row(report, "0")["epsilon_spent"] == "Infinity"
    assert report["verdict"]["within_budget"] is False


def test_user_level_epsilon_is_the_lineage_final_value_by_mechanism() -> None:
    cfg = config(secagg__method="paillier", secagg__noise_sigma_total=2.0, secagg__clip_norm=1.0)
    rounds = [
        rnd(1, ["0", "1"], central_epsilon=1.0, released_epsilon=0.4, dp_mode="distributed"),
        rnd(2, ["0", "1"], central_epsilon=1.5, released_epsilon=0.6, dp_mode="distributed"),
        rnd(3, ["0", "1"], central_epsilon=9.0, dp_mode="distributed"),  # abandoned: attempt 2 redid round 3
        rnd(3, ["0", "1"], attempt=2, central_epsilon=2.0, released_epsilon=0.8, dp_mode="distributed"),
    ]
    privacy = build_report(export(cfg, rounds, attempt=2), audit=AUDIT_OK)["privacy"]
    assert privacy["central"] is None
    assert privacy["distributed"] == {"epsilon": 2.0, "released_epsilon": 0.8, "delta": 1e-5, "released_rounds": 3,
                                      "superseded_releases": 1}


# -- threat model -----------------------------------------------------------------


def test_without_any_dp_the_report_says_there_is_no_dp_guarantee() -> None:
    report = build_report(export(config()), audit=AUDIT_OK)
    mechanisms = " ".join(t["mechanism"] for t in report["threat_model"])
    assert "DP" not in mechanisms
    unprotected = entry(report, NOT_PROTECTED)
    assert report["threat_model"][-1] == unprotected
    assert any(n.startswith("No differential privacy") for n in unprotected["not_covered"])
    assert any("visible to the server in the clear" in n for n in unprotected["not_covered"])
    assert "no DP guarantee" in report["verdict"]["summary"]
    assert report["privacy"]["client_dp"]["enabled"] is False


def test_local_dp_states_a_per_record_per_client_cumulative_guarantee_and_its_limits() -> None:
    report = build_report(export(dp_config()), audit=AUDIT_OK)
    dp = entry(report, "Client-side DP-SGD")
    assert "per record, per client, cumulative" in dp["guarantee"]
    assert "cap epsilon = 2" in dp["guarantee"]
    assert any("participation" in n for n in dp["not_covered"])
    assert not any(n.startswith("No differential privacy") for n in entry(report, NOT_PROTECTED)["not_covered"])


def test_paillier_single_key_says_the_decryptor_is_trusted() -> None:
    cfg = config(secagg__method="paillier", secagg__key_mode="single", secagg__decryptors=1)
    paillier = entry(build_report(export(cfg), audit=AUDIT_OK), "Paillier")
    assert "single key" in paillier["mechanism"]
    assert "decryptor is TRUSTED" in paillier["adversary"]
    assert "without a cross-check" in paillier["adversary"]
    assert any("any one client decrypts every upload" in n for n in paillier["not_covered"])


def test_paillier_with_unrecorded_key_mode_assumes_the_weaker_single_key() -> None:
    paillier = entry(build_report(export(config(secagg__method="paillier")), audit=AUDIT_OK), "Paillier")
    assert "not recorded" in paillier["mechanism"]
    assert "TRUSTED" in paillier["adversary"]
    assert any("assume the weaker" in n for n in paillier["not_covered"])


def test_paillier_under_dp_is_threshold_because_start_up_refuses_a_single_key() -> None:
    cfg = dp_config(privacy__client__mode="distributed", secagg__method="paillier", secagg__min_contributors=10)
    report = build_report(export(cfg), audit=AUDIT_OK)
    paillier = entry(report, "Paillier")
    assert "threshold" in paillier["mechanism"] and "TRUSTED" not in paillier["adversary"]
    assert "t - 1 colluding clients" in paillier["adversary"]
    fedsgd = entry(report, "Distributed DP-FedSGD")
    assert "m = 10" in fedsgd["adversary"]
    assert any("sqrt((m - c) / (m - 1))" in n for n in fedsgd["not_covered"])
    assert any(n.startswith("OFF for individual updates") for n in entry(report, "Update validation")["not_covered"])


def test_central_dp_names_the_server_as_trusted() -> None:
    central = entry(build_report(export(config(privacy__central__enabled=True)), audit=AUDIT_OK), "Central DP")
    assert "server is TRUSTED" in central["adversary"]
    assert "user-level" in central["guarantee"]


def test_robust_rule_and_detector_state_their_bounds_including_rule_switches() -> None:
    cfg = config(strategy__name="fedavg", strategy__num_malicious=0, defense__name="detect")
    actions = [{"id": 1, "action": "set_rule", "params": {"rule": "trimmedmean"}, "reason": "attack seen",
                "requested_by": "alice", "requested_at": 1500.0, "status": "applied", "boundary_round": 1,
                "effective_round": 2, "result": "rule trimmedmean from round 2"}]
    report = build_report(export(cfg), audit=AUDIT_OK, actions=actions)
    robust = entry(report, "Robust aggregation rule")
    assert "trimmedmean from round 2" in robust["guarantee"]
    assert robust["not_covered"][0].startswith("Configured with f = 0")
    assert any("non-robust rule" in n for n in robust["not_covered"])
    assert "no formal bound" in entry(report, "Anomaly detection")["guarantee"]
    assert report["operator_actions"] == actions


def test_audit_entry_depends_on_the_signing_key() -> None:
    unsigned = entry(build_report(export(config()), audit=AUDIT_OK), "Audit chain")
    assert "unsigned" in unsigned["mechanism"] and unsigned["not_covered"][0].startswith("Unsigned")
    signed_status = {**AUDIT_OK, "signed": True, "checked_signature": True}
    signed = entry(build_report(export(config()), audit=signed_status), "Audit chain")
    assert "does not hold the operator's Ed25519 signing key" in signed["adversary"]
    assert signed["not_covered"][0].startswith("A holder of the signing key")


# -- participants and refusals (through a real store) -------------------------------


def test_resumed_run_lists_only_the_lineage_as_participants(store: RunStore) -> None:
    cfg = config()
    run_id = store_run(store, cfg)
    for number in (1, 2, 3):
        commit(store, number, 1, {"0": ("accepted", ""), "1": ("accepted", ""), "9": ("accepted", "")})
    # attempt 1 reached round 3 and died; attempt 2 resumed from the checkpoint of round 1
    assert store.start_attempt(run_id) == 2
    commit(store, 2, 2, {"0": ("accepted", ""), "1": ("refused", "norm 1e9 above bound 1000")},
           [("update_rejected", "1", "norm 1e9 above bound 1000")])
    commit(store, 3, 2, {"0": ("accepted", ""), "1": ("accepted", "")})
    store.finish_run(run_id, "completed")

    report = build_report(store.export(run_id), audit=AUDIT_OK)
    assert [(p["round"], p["attempt"]) for p in report["participants"]] == [(1, 1), (2, 2), (3, 2)]
    assert [p["participants"] for p in report["participants"]] == [["0", "1", "9"], ["0"], ["0", "1"]]
    assert report["participants"][1]["refused"] == 1
    assert report["superseded_rounds"] == [{"round": 2, "attempt": 1}, {"round": 3, "attempt": 1}]
    assert report["run"]["attempts"] == 2
    html = render_html(report)
    assert "round 2 of attempt 1" in html


def test_a_refused_update_appears_once_with_its_reason(store: RunStore) -> None:
    reason = "update norm 3.2e+09 above validation.max_update_norm=1000"
    run_id = store_run(store, config())
    commit(store, 1, 1, {"0": ("accepted", ""), "1": ("refused", reason)}, [("update_rejected", "1", reason),
                                                                           ("client_failure", "2", "node lost")])
    store.finish_run(run_id, "completed")

    report = build_report(store.export(run_id), audit=AUDIT_OK)
    refused = [r for r in report["refusals"] if r["reason"] == reason]
    assert len(refused) == 1
    assert refused[0] == {"round": 1, "attempt": 1, "client": "1", "status": "refused", "kind": "update_rejected",
                          "reason": reason, "source": "update+event", "superseded": False}
    failure = [r for r in report["refusals"] if r["kind"] == "client_failure"]
    assert [(f["client"], f["status"], f["reason"]) for f in failure] == [("2", "failed", "node lost")]
    assert render_html(report).count(reason) == 1


def test_refusals_of_an_abandoned_attempt_are_kept_and_marked() -> None:
    rounds = [rnd(1, ["0"]), rnd(1, ["0"], attempt=2)]
    events = [event(1, "client_quarantined", "reputation 0.2 < 0.4", time=1110.0, client="5"),
              event(1, "client_quarantined", "reputation 0.3 < 0.4", time=2110.0, client="6")]
    report = build_report(export(config(), rounds, events=events, attempt=2), audit=AUDIT_OK)
    marks = {r["client"]: (r["attempt"], r["superseded"]) for r in report["refusals"]}
    assert marks == {"5": (1, True), "6": (2, False)}


def test_declined_and_quarantined_updates_are_refusals_and_accepted_ones_are_not() -> None:
    updates = [upd(1, "0"), upd(1, "1", "declined", "epsilon budget exhausted"), upd(1, "2", "quarantined", "flagged")]
    report = build_report(export(config(), [rnd(1, ["0"])], updates), audit=AUDIT_OK)
    assert [(r["client"], r["status"]) for r in report["refusals"]] == [("1", "declined"), ("2", "quarantined")]


# -- verdict and HTML ----------------------------------------------------------------


def test_failed_audit_fails_the_verdict() -> None:
    audit = {**AUDIT_OK, "ok": False, "line": "audit log TAMPERED at entry 7: entry 7 was edited"}
    report = build_report(export(config()), audit=audit)
    assert report["verdict"]["audit_ok"] is False
    assert "FAILED" in report["verdict"]["summary"]
    html = render_html(report)
    assert "TAMPERED at entry 7" in html and 'class="verdict attention"' in html


def test_an_unfinished_run_is_not_completed() -> None:
    report = build_report(export(config(), status="interrupted", last_round=1), audit=AUDIT_OK)
    assert report["verdict"]["completed"] is False
    assert "1/3 rounds" in report["verdict"]["summary"]


def test_injected_markup_is_escaped_everywhere_in_the_html() -> None:
    tag = "<script>alert(1)</script>"
    cfg = dp_config()
    cfg["name"] = tag
    updates = [upd(1, tag, "refused", f"bad {tag}", epsilon=1.0), upd(1, '"><img src=x onerror=alert(2)>')]
    events = [event(1, "client_excluded", f"excluded {tag}", 1110.0, client=tag)]
    actions = [{"id": 1, "action": "block", "params": {"client": tag}, "reason": tag, "requested_by": tag,
                "requested_at": 1500.0, "status": "refused", "boundary_round": None, "effective_round": None,
                "result": tag}]
    report = build_report(export(cfg, [rnd(1, [tag])], updates, events, name=tag, error=tag), audit=AUDIT_OK,
                          actions=actions)
    html = render_html(report)
    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_html_is_self_contained_and_printable() -> None:
    html = render_html(build_report(export(dp_config()), audit=AUDIT_OK, generated_at=0.0))
    assert "@media print" in html
    for external in ("<link", "<script", "@import", "url(", "http://", "https://", "<iframe", "<img"):
        assert external not in html
    for heading in ("Verdict", "Run", "Threat model", "Privacy", "Participants per round",
                    "Refusals, exclusions and failures", "Operator actions", "Audit chain"):
        assert f"<h2>{heading}</h2>" in html


def test_report_keys_are_stable_and_json_ready(store: RunStore) -> None:
    cfg = dp_config()
    run_id = store_run(store, cfg, name="nightly")
    commit(store, 1, 1, {"0": ("accepted", ""), "1": ("accepted", "")}, epsilon=0.9)
    store.finish_run(run_id, "completed")
    before = store.export(run_id)
    snapshot = copy.deepcopy(before)

    report = build_report(before, audit=AUDIT_OK, generated_at=1796160717.5)
    assert set(report) == STABLE_KEYS
    assert before == snapshot  # the export is not modified
    assert report["generated_at_iso"] == "2026-12-01T21:31:57Z"
    assert set(report["run"]) >= {"id", "name", "status", "started_at", "started_at_iso", "ended_at", "ended_at_iso",
                                  "rounds_done", "rounds_planned", "attempts", "config_hash", "code_version", "error"}
    assert report["run"]["config_hash"] == config_hash(cfg)
    assert all(set(t) == {"mechanism", "basis", "protects", "adversary", "guarantee", "not_covered"}
               for t in report["threat_model"])
    assert set(report["verdict"]) == {"audit_ok", "within_budget", "completed", "summary"}
    assert report["verdict"]["summary"].startswith("PASS")
    assert json.loads(json.dumps(report, allow_nan=False)) == report
