"""``fedapp serve`` against a real uvicorn on loopback: the v1 answers, the auth matrix, hostile input, refusals.

Threat model of the auth tests: a caller on the network who has no token, a
token signed with another secret, an expired or revoked token, a token with its
claims edited (role raised, ``alg: none``), or a viewer's token, tries every
endpoint: each is refused (401, or 403 for a viewer's action) and none of the
responses or log lines carries the signing secret.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedapp.api.auth import AUDIENCE, ISSUER, issue_token, load_secret, parse_duration
from fedapp.config import ExperimentConfig
from fedapp.store.audit import AuditLog
from fedapp.store.db import RunStore
from fedapp.store.records import ClientUpdateRecord, EventRecord, RoundRecord, RunRecord, TokenRecord, config_hash
from tests.api_live import LiveAPI

# ---- a store with a finished run (client DP, a resume, refusals) and running ones -------------------


def _run(run_id: str, cfg: dict[str, Any], out: Path, status: str = "running") -> RunRecord:
    config = ExperimentConfig.from_dict({"num_rounds": 3, "partition": {"num_clients": 4}, **cfg}).to_dict()
    return RunRecord(run_id=run_id, name=run_id.split("-")[0], config=config, config_hash=config_hash(config),
                     code_version="v-test", status=status, started_at=time.time(), output_dir=str(out))


def _round(run_id: str, rnd: int, attempt: int, accuracy: float, clients: list[str]) -> RoundRecord:
    start = 1000.0 + 10 * rnd + attempt
    return RoundRecord(run_id, rnd, attempt, {"test_accuracy": accuracy, "test_loss": 1.0 / rnd, "fit_sampled": 4,
                                               "fit_trained": len(clients)}, start, start + 2.0, clients)


def populate(store_url: str, tmp_path: Path) -> None:
    """``dp-1``: 3 rounds under client DP (budget 3), round 2 of attempt 1 superseded by attempt 2;
    client 1 refused once, client 2 quarantined, client 3 out of budget. ``live-1``, ``central-1``,
    ``secagg-1``: running."""
    out = tmp_path / "dp-1"
    out.mkdir()
    audit = AuditLog(out / "audit.jsonl", run_id="dp-1")
    audit.append("run_start", 0, name="dp")
    with RunStore(store_url) as store:
        store.create_run(_run("dp-1", {"privacy": {"client": {"enabled": True, "target_epsilon": 3.0}}}, out))
        store.commit_round("dp-1", _round("dp-1", 1, 1, 0.5, ["0", "1", "2", "3"]), [
            ClientUpdateRecord("dp-1", 1, 1, "0", "accepted", epsilon=1.0, reputation=1.0, anomaly_score=0.1),
            ClientUpdateRecord("dp-1", 1, 1, "1", "refused", reason="update norm 90 > bound 10", epsilon=1.0),
            ClientUpdateRecord("dp-1", 1, 1, "2", "quarantined", reason="flagged", epsilon=1.0, reputation=0.2,
                               anomaly_score=7.5),
            ClientUpdateRecord("dp-1", 1, 1, "3", "accepted", epsilon=2.9),
        ], [EventRecord("dp-1", 1, "client_quarantined", "reputation 0.200 < 0.5", {"client": "2"}, 1.0)],
            None, audit_head=audit.head, audit_seq=audit.seq)
        store.commit_round("dp-1", _round("dp-1", 2, 1, 0.1, ["0"]), [
            ClientUpdateRecord("dp-1", 2, 1, "0", "accepted", epsilon=2.0),  # abandoned by the resume, still spent
        ], [], None, audit_head=audit.head, audit_seq=audit.seq)
        store.start_attempt("dp-1")
        for rnd in (2, 3):
            audit.append("aggregation", rnd)
            store.commit_round("dp-1", _round("dp-1", rnd, 2, 0.6 + rnd / 10, ["0"]), [
                ClientUpdateRecord("dp-1", rnd, 2, "0", "accepted", epsilon={2: 2.4, 3: 2.8}[rnd]),
            ], [EventRecord("dp-1", rnd, "client_excluded", "privacy budget spent", {
                "client": "3", "reason_code": "privacy_budget"}, 2.0)] if rnd == 2 else [],
                None, audit_head=audit.head, audit_seq=audit.seq)
        store.finish_run("dp-1", "completed", audit_head=audit.head, audit_seq=audit.seq)
        for run_id, cfg in (("live-1", {}), ("central-1", {"privacy": {"central": {"enabled": True}}}),
                            ("secagg-1", {"secagg": {"method": "secaggplus"}})):
            store.create_run(_run(run_id, cfg, tmp_path / run_id))
            store.commit_round(run_id, _round(run_id, 1, 1, 0.5, ["0", "1"]), [
                ClientUpdateRecord(run_id, 1, 1, "0", "accepted"), ClientUpdateRecord(run_id, 1, 1, "1", "accepted"),
            ], [], None, audit_head="", audit_seq=0)


@pytest.fixture()
def api(tmp_path: Path) -> LiveAPI:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    populate(url, tmp_path)
    with LiveAPI(url, tmp_path / "secret") as live:
        yield live


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> LiveAPI:
    """One server for the tests whose requests are all refused (nothing they send changes the store)."""
    folder = tmp_path_factory.mktemp("shared")
    url = f"sqlite:///{folder / 'store.db'}"
    populate(url, folder)
    with LiveAPI(url, folder / "secret") as live:
        yield live


def get(api: LiveAPI, path: str, role: str = "viewer") -> Any:
    answer = httpx.get(api.url + path, headers=api.headers(role), timeout=10)
    assert answer.status_code == 200, (path, answer.status_code, answer.text)
    return answer.json()


# ---- reads ------------------------------------------------------------------------------------------


def test_runs_rounds_clients_and_privacy_read_back_what_the_store_holds(api: LiveAPI) -> None:
    runs = {r["run_id"]: r for r in get(api, "/api/v1/runs")["runs"]}
    assert set(runs) == {"dp-1", "live-1", "central-1", "secagg-1"}
    dp = runs["dp-1"]
    assert (dp["status"], dp["last_round"], dp["num_rounds"], dp["attempt"]) == ("completed", 3, 3, 2)
    assert dp["privacy"]["client_dp"] and dp["privacy"]["epsilon_budget"] == 3.0
    assert dp["latest"]["test_accuracy"] == pytest.approx(0.9)

    rounds = get(api, "/api/v1/runs/dp-1/rounds")["rounds"]
    assert [(r["round"], r["attempt"]) for r in rounds] == [(1, 1), (2, 2), (3, 2)]  # attempt 1's round 2 superseded

    clients = {c["client"]: c for c in get(api, "/api/v1/runs/dp-1/clients")["clients"]}
    assert clients["0"]["epsilon"] == 2.8  # the ledger's latest (cumulative) figure
    assert clients["0"]["budget_left"] == pytest.approx(0.2)
    assert (clients["1"]["refusal_count"], clients["1"]["refusals"][0]["reason"]) == (1, "update norm 90 > bound 10")
    assert (clients["2"]["status"], clients["2"]["reputation"], clients["2"]["anomaly_score"]) == ("quarantined", 0.2, 7.5)
    assert clients["3"]["status"] == "excluded" and "budget" in clients["3"]["status_reason"]

    privacy = get(api, "/api/v1/runs/dp-1/privacy")
    assert [p["epsilon"] for p in privacy["clients"]["0"]] == [1.0, 2.4, 2.8]  # the model's lineage
    assert privacy["max_client_epsilon"] == 2.9
    assert privacy["exhausted"] == [{"client": "3", "round": 2, "reason": "privacy budget spent"}]

    events = get(api, "/api/v1/runs/dp-1/events")["events"]
    assert [e["kind"] for e in events] == ["client_quarantined", "client_excluded"]
    assert get(api, f"/api/v1/runs/dp-1/events?after={events[0]['id']}")["events"] == events[1:]


def test_audit_status_and_the_compliance_report_see_a_tampered_log(api: LiveAPI, tmp_path: Path) -> None:
    assert get(api, "/api/v1/runs/dp-1/audit")["ok"] is True
    report = get(api, "/api/v1/runs/dp-1/report")
    assert report["verdict"]["audit_ok"] is True and report["verdict"]["within_budget"] is True
    html = httpx.get(api.url + "/api/v1/runs/dp-1/report.html", headers=api.headers(), timeout=10)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "dp-1" in html.text and "<script" not in html.text

    log = tmp_path / "dp-1" / "audit.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = lines[1].replace('"aggregation"', '"note"')  # an insider edits history
    log.write_text("\n".join(lines) + "\n")
    status = get(api, "/api/v1/runs/dp-1/audit")
    assert status["ok"] is False and "TAMPERED" in status["line"]
    assert get(api, "/api/v1/runs/dp-1/report")["verdict"]["audit_ok"] is False


def test_metrics_parse_with_prometheus_client_and_match_the_store(api: LiveAPI) -> None:
    answer = httpx.get(api.url + "/metrics", headers=api.headers(), timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {(s.name, s.labels.get("run_id")): s.value
               for family in text_string_to_metric_families(answer.text) for s in family.samples}
    assert samples[("fedapp_round", "dp-1")] == 3
    assert samples[("fedapp_test_accuracy", "dp-1")] == pytest.approx(0.9)
    assert samples[("fedapp_epsilon_max", "dp-1")] == pytest.approx(2.9)
    assert samples[("fedapp_run_running", "live-1")] == 1


def test_health_and_readiness_need_no_token_and_the_dashboard_is_served(api: LiveAPI) -> None:
    assert httpx.get(api.url + "/api/v1/health").json()["status"] == "ok"
    ready = httpx.get(api.url + "/api/v1/ready").json()
    assert ready == {"status": "ready"}  # not where the store is: the caller is anonymous
    page = httpx.get(api.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert httpx.get(api.url + "/openapi.json").json()["info"]["title"] == "fedapp control plane"


# ---- the auth matrix ----------------------------------------------------------------------------------

OPEN = {"/api/v1/health", "/api/v1/ready"}


def endpoints(api: LiveAPI) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the API that needs a token, from its own OpenAPI schema."""
    fill = {"{run_id}": "live-1", "{action_id}": "1"}
    found = []
    for path, methods in api.app.openapi()["paths"].items():
        if path in OPEN:
            continue
        for key, value in fill.items():
            path = path.replace(key, value)
        found += [(method.upper(), path) for method in methods]
    return found


def forged_tokens(api: LiveAPI) -> dict[str, str]:
    """One token per way of being refused with 401."""
    now = int(time.time())
    valid = api.token("operator", subject="mallory")
    claims = jwt.decode(valid, options={"verify_signature": False})
    expired_token, expired = issue_token(api.store, api.secret, subject="late", role="operator", lifetime_s=1)
    revoked = api.token("operator", subject="fired")
    api.store.revoke_token(jwt.decode(revoked, options={"verify_signature": False})["jti"])
    header, _, signature = valid.split(".")
    body = base64.urlsafe_b64encode(json.dumps({**claims, "role": "operator", "sub": "eve"}).encode()).rstrip(b"=")
    none_alg = jwt.encode({**claims}, key="", algorithm="none") if "none" in jwt.algorithms.get_default_algorithms() else valid + "x"
    unknown_id = jwt.encode({**claims, "jti": "f" * 32}, api.secret, algorithm="HS256")  # signed, never issued
    time.sleep(max(0.0, expired.expires_at + 1.1 - time.time()))
    return {
        "none": "",
        "garbage": "not-a-jwt",
        "bad signature": jwt.encode({**claims}, b"another secret of at least 32 bytes!!", algorithm="HS256"),
        "edited claims": f"{header}.{body.decode()}.{signature}",
        "alg none": none_alg,
        "wrong audience": jwt.encode({**claims, "aud": "another-api"}, api.secret, algorithm="HS256"),
        "wrong issuer": jwt.encode({**claims, "iss": "someone"}, api.secret, algorithm="HS256"),
        "no expiry": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, api.secret, algorithm="HS256"),
        "expired": expired_token,
        "revoked": revoked,
        "never issued": unknown_id,
        "future iat past exp": jwt.encode({**claims, "iat": now, "exp": now - 5}, api.secret, algorithm="HS256"),
    }


def test_every_endpoint_refuses_every_bad_token_and_a_viewers_action(api: LiveAPI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    routes = endpoints(api)
    assert ("POST", "/api/v1/runs/live-1/actions") in routes and ("GET", "/metrics") in routes and len(routes) >= 14
    body = {"action": "pause"}
    answers = []
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for name, token in forged_tokens(api).items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            for method, path in routes:
                answer = http.request(method, path, headers=headers, json=body if method == "POST" else None)
                answers.append(answer)
                assert answer.status_code == 401, (name, method, path, answer.status_code, answer.text)
                assert answer.headers.get("www-authenticate") == "Bearer"
        viewer = {"Authorization": f"Bearer {api.token('viewer')}"}
        for method, path in routes:
            if method == "POST":
                answer = http.post(path, headers=viewer, json=body)
                assert answer.status_code == 403, (path, answer.text)
                answers.append(answer)
        assert http.get("/api/v1/runs/live-1/actions", headers=viewer).json()["actions"] == []  # nothing queued
    secret = api.secret.decode()
    assert all(secret not in a.text for a in answers)
    assert secret not in caplog.text


def test_an_operator_token_acts_and_is_named_in_the_request(api: LiveAPI) -> None:
    token = api.token("operator", subject="alice")
    answer = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "pause", "reason": "maintenance"},
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 202, answer.text
    action = answer.json()
    assert (action["status"], action["requested_by"], action["reason"]) == ("pending", "alice", "maintenance")
    assert get(api, f"/api/v1/runs/live-1/actions/{action['id']}")["status"] == "pending"
    api.store.revoke_token(jwt.decode(token, options={"verify_signature": False})["jti"])
    time.sleep(api.verifier.recheck_s + 0.05)  # a token that passed is re-checked against the store after 1 s
    again = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "resume"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert again.status_code == 401 and again.json()["detail"] == "token revoked"


# ---- hostile input ------------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/api/v1/runs/live-1/actions", b"{not json"),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "detonate"}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "block"}),  # no client
    ("POST", "/api/v1/runs/live-1/actions", {"action": "pause", "client": "1"}),  # a parameter pause does not take
    ("POST", "/api/v1/runs/live-1/actions", {"action": "block", "client": "<script>alert(1)</script>"}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "block", "client": "9"}),  # never took part
    ("POST", "/api/v1/runs/live-1/actions", {"action": "set_rule", "rule": "__import__('os')"}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "set_clients_per_round", "clients_per_round": -3}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "set_clients_per_round", "clients_per_round": "many"}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "set_clients_per_round", "clients_per_round": 1e300}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "set_clients_per_round", "clients_per_round": True}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "set_clients_per_round", "clients_per_round": "3"}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "pause", "extra": True}),
    ("POST", "/api/v1/runs/live-1/actions", {"action": "pause", "reason": "x" * 10_000}),
    ("POST", "/api/v1/runs/live-1/actions", [1, 2, 3]),
    ("POST", "/api/v1/runs/live-1/actions", b"x" * 200_000),
    ("POST", "/api/v1/runs/dp-1/actions", {"action": "pause"}),  # a finished run
    ("POST", "/api/v1/runs/nope/actions", {"action": "pause"}),
    ("GET", "/api/v1/runs/nope", None),
    ("GET", "/api/v1/runs/nope/clients", None),
    ("GET", "/api/v1/runs/..%2F..%2Fetc%2Fpasswd/rounds", None),
    ("GET", "/api/v1/runs/a%00b/privacy", None),
    ("GET", "/api/v1/runs/" + "r" * 300 + "/rounds", None),
    ("GET", "/api/v1/runs/live-1/actions/0", None),
    ("GET", "/api/v1/runs/live-1/actions/-1", None),
    ("GET", "/api/v1/runs/live-1/actions/99999999999999", None),
    ("GET", "/api/v1/runs/live-1/actions/12345", None),
    ("GET", "/api/v1/runs/live-1/actions/abc", None),
    ("GET", "/api/v1/runs/live-1/actions/1?wait_s=1e9", None),
    ("GET", "/api/v1/runs?limit=-1", None),
    ("GET", "/api/v1/runs?limit=abc", None),
    ("GET", "/api/v1/runs/live-1/events?after=-5", None),
    ("GET", "/api/v1/runs/live-1/events?limit=100000", None),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_REQUESTS)
def test_malformed_bodies_and_ids_get_a_4xx_with_a_reason_never_a_5xx(
    shared_api: LiveAPI, method: str, path: str, body: Any
) -> None:
    api = shared_api
    headers = api.headers("operator")
    if isinstance(body, bytes):
        answer = httpx.request(method, api.url + path, headers={**headers, "content-type": "application/json"},
                               content=body, timeout=10)
    else:
        answer = httpx.request(method, api.url + path, headers=headers, json=body, timeout=10)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    assert answer.json()["detail"]


@pytest.mark.parametrize(
    ("run_id", "body", "reason"),
    [
        ("secagg-1", {"action": "set_rule", "rule": "krum"}, "under secure aggregation"),
        ("central-1", {"action": "set_rule", "rule": "trimmedmean"}, "under central DP"),
        ("central-1", {"action": "set_clients_per_round", "clients_per_round": 3}, "sampling rate"),
        ("live-1", {"action": "set_rule", "rule": "fedavg"}, "already fedavg"),
        ("live-1", {"action": "set_rule", "rule": "fedavgm"}, "momentum"),
        ("live-1", {"action": "set_clients_per_round", "clients_per_round": 1}, "below strategy.min_fit_clients=2"),
        ("live-1", {"action": "set_clients_per_round", "clients_per_round": 9}, "exceeds the run's 4 clients"),
    ],
)
def test_actions_the_configuration_cannot_honour_are_refused_with_the_reason(
    shared_api: LiveAPI, run_id: str, body: dict[str, Any], reason: str
) -> None:
    api = shared_api
    answer = httpx.post(api.url + f"/api/v1/runs/{run_id}/actions", json=body, headers=api.headers("operator"), timeout=10)
    assert answer.status_code == 409, answer.text
    assert reason in answer.json()["detail"]
    assert api.store.actions(run_id, status="pending") == []  # nothing queued...
    attempt = [a for a in api.store.actions(run_id, status="refused") if a.params == {k: v for k, v in body.items()
                                                                                      if k != "action"}][-1]
    assert (attempt.action, attempt.requested_by, attempt.result) == (body["action"], "test-operator",
                                                                      answer.json()["detail"])  # ...but on record


# ---- tokens and the secret ----------------------------------------------------------------------------


def test_a_secret_file_other_accounts_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    load_secret(path, create=True)
    assert (os.stat(path).st_mode & 0o777) == 0o600
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_secret(path)


@pytest.mark.parametrize("text", ["12", "0h", "-1h", "400d", "1y", "h"])
def test_token_lifetimes_must_be_a_positive_duration_with_a_unit(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
    assert parse_duration("12h") == 43200 and parse_duration("30m") == 1800


def test_tokens_cli_prints_the_token_once_and_revokes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fedapp.cli import app

    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("FEDAPP_STORE_URL", url)
    monkeypatch.setenv("FEDAPP_API_SECRET_FILE", str(tmp_path / "secret"))
    runner = CliRunner()
    made = runner.invoke(app, ["tokens", "create", "--role", "operator", "--expires", "2h", "--subject", "ops"])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    claims = jwt.decode(token, load_secret(tmp_path / "secret"), algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert (claims["role"], claims["sub"]) == ("operator", "ops") and 7100 < claims["exp"] - claims["iat"] <= 7200
    listed = runner.invoke(app, ["tokens", "list"])
    assert claims["jti"] in listed.stdout and token not in listed.stdout and "valid" in listed.stdout
    assert runner.invoke(app, ["tokens", "revoke", claims["jti"]]).exit_code == 0
    with RunStore(url) as store:
        record = store.get_token(claims["jti"])
    assert isinstance(record, TokenRecord) and record.revoked_at is not None
    bad = runner.invoke(app, ["tokens", "create", "--role", "admin"])
    assert bad.exit_code == 2 and "role must be one of viewer, operator" in bad.output


def test_https_with_a_certificate_from_the_deployment_ca(tmp_path: Path) -> None:
    from fedapp.deploy.credentials import generate_certificates

    url = f"sqlite:///{tmp_path / 'store.db'}"
    populate(url, tmp_path)
    ca, cert, key = generate_certificates(tmp_path / "tls", "127.0.0.1")
    with LiveAPI(url, tmp_path / "secret", ssl={"certfile": str(cert), "keyfile": str(key)}) as live:
        assert live.url.startswith("https://")
        answer = httpx.get(live.url + "/api/v1/runs", headers=live.headers(), verify=str(ca), timeout=10)
        assert answer.status_code == 200 and len(answer.json()["runs"]) == 4
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
            httpx.get(live.url + "/api/v1/health", timeout=10)
