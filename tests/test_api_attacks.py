"""A security review of the control plane (``fedapp serve``, the actions' applier, the records behind them).

Each attack is a test in which the attacker tries and fails. The tests named after
a finding (label binding, chunked bodies, long-polls, displaced exclusions, blocks
under DP, the store's location, ...) failed against the first cut of the control
plane and pass since its fixes.

Attackers: (a) the network without a token, (b) a viewer, (c) an expired/revoked
token, (d) a malicious federated client that chooses its own label
(``partition_id``), metrics and reasons, (e) an operator trying what the run's
configuration forbids, (f) anyone trying for a 5xx, a hang or a leak.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import socket
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from prometheus_client.parser import text_string_to_metric_families

from fedapp.api.auth import issue_token, load_secret, secret_file
from fedapp.config import ExperimentConfig
from fedapp.control.applier import RunControl
from fedapp.exclusion import Exclusion
from fedapp.metrics import RunRecorder
from fedapp.robustness import QUARANTINE_CODE
from fedapp.store.db import RunStore
from fedapp.store.durable import DurableRun
from fedapp.store.records import ActionRecord, ClientUpdateRecord, EventRecord
from fedapp.wrappers import MetricsRecording, client_label
from tests.api_live import LiveAPI
from tests.test_api import _round, _run, api, populate  # noqa: F401 - api: the per-test server fixture

STATIC = Path(__file__).resolve().parents[1] / "fedapp" / "api" / "static"


# ---- servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> LiveAPI:
    """One server (with a 5 s read cache) for attacks that change nothing in the store."""
    folder = tmp_path_factory.mktemp("attacks")
    url = f"sqlite:///{folder / 'store.db'}"
    populate(url, folder)
    with LiveAPI(url, folder / "secret", cache_s=5.0) as live:
        live.folder = folder  # type: ignore[attr-defined]
        yield live


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# ---- (a)-(c): tokens ----------------------------------------------------------------------------------


def test_alg_confusion_and_key_header_tricks_are_refused(shared: LiveAPI) -> None:
    api = shared
    claims = claims_of(api.token("viewer", subject="mallory"))
    elevated = {**claims, "role": "operator"}
    attacker_key = b"attacker-controlled key of 32+ bytes!!"
    forged = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(elevated)}.",
        "alg NONE": f"{b64({'alg': 'NONE', 'typ': 'JWT'})}.{b64(elevated)}.",
        "HS512 with the real secret": jwt.encode(claims, api.secret, algorithm="HS512"),
        "RS256 header, HS signature": (lambda t: f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{t.split('.')[1]}."
                                       f"{t.split('.')[2]}")(jwt.encode(claims, api.secret, algorithm="HS256")),
        "jku/x5u to attacker": jwt.encode(elevated, attacker_key, algorithm="HS256",
                                          headers={"jku": "http://127.0.0.1:1/jwks", "x5u": "http://127.0.0.1:1/x"}),
        "kid path traversal": jwt.encode(elevated, attacker_key, algorithm="HS256", headers={"kid": "../../../../dev/null"}),
        "embedded jwk": jwt.encode(elevated, attacker_key, algorithm="HS256",
                                   headers={"jwk": {"kty": "oct", "k": base64.urlsafe_b64encode(attacker_key).decode()}}),
    }
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for name, token in forged.items():
            assert http.get("/api/v1/whoami", headers=bearer(token)).status_code == 401, name
            answer = http.post("/api/v1/runs/live-1/actions", headers=bearer(token), json={"action": "pause"})
            assert answer.status_code == 401, (name, answer.text)
    assert api.store.actions("live-1") == []


def test_claims_that_disagree_with_the_store_record_or_lack_a_claim_are_refused(shared: LiveAPI) -> None:
    """Even a token signed with the real secret (a minting bug, a leaked old secret) must match its record."""
    api = shared
    viewer = claims_of(api.token("viewer", subject="vic"))
    now = int(time.time())
    resigned = {
        "role raised": {**viewer, "role": "operator"},
        "subject changed": {**viewer, "sub": "alice"},
        "jti of another type": {**viewer, "jti": {"$ne": ""}},
        **{f"no {k}": {c: v for c, v in viewer.items() if c != k} for k in ("jti", "sub", "role", "iat", "aud", "iss")},
    }
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for name, claims in resigned.items():
            token = jwt.encode(claims, api.secret, algorithm="HS256")
            assert http.get("/api/v1/whoami", headers=bearer(token)).status_code == 401, name
        # a token whose exp was stretched past its record's expiry dies with the record
        short_token, record = issue_token(api.store, api.secret, subject="short", role="operator", lifetime_s=1)
        stretched = jwt.encode({**claims_of(short_token), "exp": now + 86400}, api.secret, algorithm="HS256")
        time.sleep(max(0.0, record.expires_at + 0.2 - time.time()))
        answer = http.get("/api/v1/whoami", headers=bearer(stretched))
        assert answer.status_code == 401 and answer.json()["detail"] == "token expired"


def test_a_token_issued_for_another_store_is_refused_even_with_the_same_secret(shared: LiveAPI, tmp_path: Path) -> None:
    with RunStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        token, _ = issue_token(other, shared.secret, subject="elsewhere", role="operator", lifetime_s=600)
    answer = httpx.get(shared.url + "/api/v1/whoami", headers=bearer(token), timeout=10)
    assert answer.status_code == 401 and answer.json()["detail"] == "unknown token"


def test_a_revoked_token_is_refused_within_a_second_on_every_cached_endpoint(shared: LiveAPI) -> None:
    api = shared  # read cache: the answers are cached; a passed token is re-checked after recheck_s (1 s)
    token = api.token("operator", subject="leaver")
    paths = ["/api/v1/runs", "/api/v1/runs/dp-1", "/api/v1/runs/dp-1/clients", "/api/v1/runs/dp-1/privacy",
             "/api/v1/runs/dp-1/events", "/api/v1/runs/dp-1/audit", "/api/v1/runs/dp-1/report",
             "/api/v1/runs/dp-1/report.html", "/metrics"]
    with httpx.Client(base_url=api.url, timeout=10, headers=bearer(token)) as http:
        assert all(http.get(p).status_code == 200 for p in paths)  # warm the cache
        api.store.revoke_token(claims_of(token)["jti"])
        time.sleep(api.verifier.recheck_s + 0.05)
        for p in paths:
            answer = http.get(p)
            assert answer.status_code == 401 and answer.json()["detail"] == "token revoked", p


def test_cached_answers_are_not_caller_specific(shared: LiveAPI) -> None:
    """The only per-caller answer (whoami) is not cached; viewers never get an operator's 202 from a cache."""
    api = shared
    with httpx.Client(base_url=api.url, timeout=10) as http:
        subjects = [http.get("/api/v1/whoami", headers=bearer(api.token(role, subject=f"s-{i}"))).json()
                    for i, role in enumerate(["viewer", "operator", "viewer"])]
        assert [(s["subject"], s["role"]) for s in subjects] == [("s-0", "viewer"), ("s-1", "operator"), ("s-2", "viewer")]
        for role, expected in (("viewer", 403), ("viewer", 403)):
            answer = http.post("/api/v1/runs/central-1/actions", headers=api.headers(role),
                               json={"action": "set_rule", "rule": "krum"})
            assert answer.status_code == expected


def test_a_body_cannot_choose_who_asked_and_a_viewer_cannot_act(shared: LiveAPI) -> None:
    api = shared
    with httpx.Client(base_url=api.url, timeout=10) as http:
        forged = http.post("/api/v1/runs/live-1/actions", headers=api.headers("operator"),
                           json={"action": "pause", "requested_by": "ceo", "status": "applied"})
        assert forged.status_code == 422
        as_viewer = http.post("/api/v1/runs/live-1/actions", headers=api.headers("viewer"), json={"action": "stop"})
        assert as_viewer.status_code == 403
    assert api.store.actions("live-1") == []


def test_an_action_id_of_another_run_is_not_reachable(api: LiveAPI) -> None:
    queued = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "pause"},
                        headers=api.headers("operator"), timeout=10).json()
    for path in (f"/api/v1/runs/central-1/actions/{queued['id']}", f"/api/v1/runs/central-1/actions/{queued['id']}?wait_s=0.5"):
        answer = httpx.get(api.url + path, headers=api.headers(), timeout=10)
        assert answer.status_code == 404, answer.text
    assert httpx.get(api.url + "/api/v1/runs/central-1/actions", headers=api.headers(), timeout=10).json()["actions"] == []


# ---- (f): hostile input, traversal, leaks -------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/static/../auth.py", "/static/%2e%2e/auth.py", "/static/..%2fauth.py", "/static/%2e%2e%2fapp.py",
    "/static/..%5capp.py", "/static//etc/passwd", "/static/", "/static/.", "/static/app.js%00.css",
])
def test_static_files_cannot_be_escaped(shared: LiveAPI, path: str) -> None:
    answer = httpx.get(shared.url + path, timeout=10)
    # 307: "/static/." -> "/static/"; 401: a path normalised out of /static needs a token like any other
    assert answer.status_code in (307, 400, 401, 404), (path, answer.status_code)
    assert "import" not in answer.text and "root:" not in answer.text


@pytest.mark.parametrize("query", ["wait_s=nan", "wait_s=inf", "wait_s=-inf", "wait_s=1e400", "wait_s=60.0001"])
def test_long_poll_waits_are_bounded(shared: LiveAPI, query: str) -> None:
    answer = httpx.get(shared.url + f"/api/v1/runs/live-1/actions/1?{query}", headers=shared.headers(), timeout=10)
    assert answer.status_code == 422, answer.text


def test_the_signing_secret_appears_in_no_answer(shared: LiveAPI) -> None:
    api = shared
    secret = api.secret.decode()
    with httpx.Client(base_url=api.url, timeout=10) as http:
        texts = [http.get(p).text for p in ("/openapi.json", "/docs", "/", "/static/app.js", "/api/v1/ready")]
        texts += [http.get(p, headers=api.headers()).text for p in ("/api/v1/runs/live-1", "/api/v1/whoami", "/metrics")]
    assert all(secret not in t for t in texts)


def test_the_default_secret_lives_outside_the_outputs_and_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDAPP_API_SECRET_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = secret_file()
    assert path == (tmp_path / ".config" / "fedapp" / "api-secret").resolve()
    load_secret(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not stat.S_IMODE(path.parent.stat().st_mode) & 0o002
    path.chmod(0o640)  # group-readable is refused too
    with pytest.raises(PermissionError):
        load_secret(path)


# ---- XSS: dashboard, report, Prometheus ----------------------------------------------------------------

HOSTILE = '<script>alert(1)</script><img src=x onerror=alert(2)><svg onload=alert(3)>"\'`</td></table>'


def test_report_html_escapes_names_reasons_subjects_and_operator_reasons(api: LiveAPI, tmp_path: Path) -> None:
    run = dataclasses.replace(_run("evil-1", {}, tmp_path / "evil-1"), name=HOSTILE, error=HOSTILE)
    api.store.create_run(run)
    api.store.commit_round("evil-1", _round("evil-1", 1, 1, 0.5, ["0", "1"]), [
        ClientUpdateRecord("evil-1", 1, 1, "0", "refused", reason=HOSTILE),
        ClientUpdateRecord("evil-1", 1, 1, "1", "declined", reason=HOSTILE),
    ], [EventRecord("evil-1", 1, "client_quarantined", HOSTILE, {"client": "1"}, 1.0)], None, audit_head="", audit_seq=0)
    token = api.token("operator", subject=HOSTILE)
    queued = httpx.post(api.url + "/api/v1/runs/evil-1/actions", json={"action": "pause", "reason": HOSTILE},
                        headers=bearer(token), timeout=10)
    assert queued.status_code == 202, queued.text
    page = httpx.get(api.url + "/api/v1/runs/evil-1/report.html", headers=api.headers(), timeout=10)
    assert page.status_code == 200
    lowered = page.text.lower()
    for tag in ("<script", "<img", "<svg", "</td></table>"):
        assert tag not in lowered, tag
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text  # shown, as text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_the_dashboard_writes_api_text_only_as_text() -> None:
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout(\"", "srcdoc", "javascript:"):
        assert sink not in script, sink
    page = (STATIC / "index.html").read_text()
    policy = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    assert "<script" not in re.sub(r'<script type="module" src="/static/app.js"></script>', "", page)


def test_prometheus_label_values_cannot_inject_samples(api: LiveAPI, tmp_path: Path) -> None:
    name = 'x"} 1\nfedapp_fake{run_id="owned"} 1\n# HELP fedapp_round pwned\\'
    api.store.create_run(dataclasses.replace(_run("prom-1", {}, tmp_path / "prom-1"), name=name))
    text = httpx.get(api.url + "/metrics", headers=api.headers(), timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "fedapp_fake" not in families
    assert any(s.labels.get("name") == name for s in families["fedapp_run_info"].samples)
    assert families["fedapp_round"].documentation.startswith("Last round")


# ---- findings: a malicious federated client (d) ---------------------------------------------------------


class _Inner(FedAvg):
    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> tuple[None, dict[str, Any]]:
        return None, {}


class _Proxy:
    def __init__(self, cid: str) -> None:
        self.cid, self.node_id = cid, int(cid)


def _reply(label: str, **metrics: Any) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]), 10,
                  {"partition_id": label, **metrics})


@pytest.mark.parametrize("key", ["self", "server_round"])
def test_a_client_metric_named_like_a_parameter_cannot_fail_the_round(tmp_path: Path, key: str) -> None:
    """wrappers.py:147-150 passes the client's metrics as **kwargs to RunRecorder.client(self, server_round, client)."""
    recording = MetricsRecording(_Inner(), RunRecorder(tmp_path))
    recording._global = [np.zeros(2, dtype=np.float32)]
    recording.aggregate_fit(1, [(_Proxy("7"), _reply("0", **{key: 1}))], [])  # TypeError today: the run fails


def test_a_colliding_label_cannot_overwrite_another_clients_privacy_record(tmp_path: Path) -> None:
    """An attacker reports partition_id '3' (honest client 3's label) and a tiny epsilon, and replies last."""
    recorder = RunRecorder(tmp_path)
    recording = MetricsRecording(_Inner(), recorder)
    recording._global = [np.zeros(2, dtype=np.float32)]
    recording.aggregate_fit(1, [(_Proxy("101"), _reply("3", epsilon=2.9)), (_Proxy("666"), _reply("3", epsilon=0.01))], [])
    durable = SimpleNamespace(run=SimpleNamespace(run_id="r"), attempt=1, recorder=recorder)
    updates = DurableRun._updates(durable, 1, DurableRun._collect(durable, 1))  # type: ignore[arg-type]
    assert 2.9 in [u.epsilon for u in updates]  # honest client 3's spend is what the report and audit chain must show


def _control(tmp_path: Path, cfg: dict[str, Any], live: list[str]) -> tuple[RunStore, RunControl]:
    store = RunStore(f"sqlite:///{tmp_path / 'ctl.db'}")
    store.create_run(_run("ctl-1", cfg, tmp_path / "ctl-1"))
    recorder = RunRecorder(tmp_path / "rec")  # the real chain's order: the control around the recording wrapper
    control = RunControl(MetricsRecording(_Inner(), recorder), ExperimentConfig.from_dict(store.get_run("ctl-1").config),
                         store, "ctl-1", recorder)
    control.client_manager = SimpleNamespace(all=lambda: {n: _Proxy(n) for n in live})  # type: ignore[assignment]
    return store, control


def _act(store: RunStore, control: RunControl, server_round: int, action: str, **params: Any) -> ActionRecord:
    queued = store.add_action(ActionRecord(run_id="ctl-1", action=action, params=params, requested_by="op",
                                           requested_at=time.time()))
    control.at_boundary(server_round)
    found = store.get_action("ctl-1", queued.id)  # type: ignore[arg-type]
    assert found is not None
    return found


def test_an_attacker_claiming_an_honest_label_cannot_get_the_honest_node_blocked(tmp_path: Path) -> None:
    store, control = _control(tmp_path, {"partition": {"num_clients": 6}}, ["101", "102", "103", "104", "105", "666"])
    with store:
        control.aggregate_fit(1, [(_Proxy(n), _reply(label)) for n, label in
                                  (("101", "3"), ("102", "1"), ("103", "2"), ("104", "4"), ("105", "5"))], [])
        control.aggregate_fit(2, [(_Proxy("666"), _reply("3"))], [])  # misbehaves under honest client 3's label
        assert "666" in control.nodes_of["node-666"] and "666" not in control.nodes_of["3"]  # recorded as node-666
        assert _act(store, control, 2, "block", client="node-666").status == "applied"  # what the dashboard shows
        assert "666" in control.excluded
        assert "101" not in control.excluded  # honest node 101 was "3" first; it stays samplable


@pytest.mark.parametrize("code", [QUARANTINE_CODE, "privacy_budget"])
def test_block_then_unblock_does_not_lift_another_exclusion(tmp_path: Path, code: str) -> None:
    store, control = _control(tmp_path, {"partition": {"num_clients": 4}}, ["101", "102", "103", "104"])
    with store:
        control.aggregate_fit(1, [(_Proxy(n), _reply(str(i))) for i, n in enumerate(["101", "102", "103", "104"])], [])
        control.excluded.add(Exclusion("103", "2", 1, code, "reputation 0.1 < 0.5"))  # the detector's/ledger's decision
        assert _act(store, control, 1, "block", client="2").status == "applied"
        assert _act(store, control, 2, "unblock", client="2").status == "applied"
        assert "103" in control.excluded  # lifting the operator's block must leave the quarantine in place


def test_blocks_under_central_dp_cannot_shrink_the_sample_below_what_the_noise_is_sized_for(tmp_path: Path) -> None:
    """m = 5 of 10 per round (q = 0.5), noise sigma*C/5; blocking 6 leaves rounds of 2 under the same noise and q."""
    live = [str(100 + i) for i in range(10)]
    cfg = {"partition": {"num_clients": 10}, "strategy": {"fraction_fit": 0.5}, "privacy": {"central": {"enabled": True}}}
    store, control = _control(tmp_path, cfg, live)
    with store:
        control.aggregate_fit(1, [(_Proxy(n), _reply(str(i))) for i, n in enumerate(live)], [])
        for label in "012345":
            _act(store, control, 1, "block", client=label)
        samplable = len([n for n in live if n not in control.excluded])
        per_round = max(control.cfg.strategy.min_fit_clients, int(samplable * control.cfg.strategy.fraction_fit))
        assert per_round >= 5, f"{per_round} clients per round under noise and accounting sized for 5 of 10"


@pytest.mark.parametrize("label", ["3\n", "\uff13", "\u0663"])
def test_a_client_cannot_pick_a_label_that_renders_like_another(label: str) -> None:
    assert client_label(_Proxy("9"), _reply(label)) == "node-9"


# ---- findings: the API ----------------------------------------------------------------------------------


def test_an_unauthenticated_chunked_body_is_cut_off_early(shared: LiveAPI) -> None:
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as conn:
        conn.sendall(b"POST /api/v1/runs/live-1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (256 * 1024)  # four times MAX_BODY_BYTES, and the body is not finished
        conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        conn.settimeout(3)
        try:
            head = conn.recv(64)
        except socket.timeout:
            head = b""  # today: the server keeps reading (it buffered 150 MB in a probe), then answers 422
    assert head.startswith((b"HTTP/1.1 413", b"HTTP/1.1 401")), head


def test_no_action_of_a_finished_run_is_left_pending(api: LiveAPI) -> None:
    # DurableRun.finish: control.close() refuses what is pending ... (window) ... store.finish_run(...)
    queued = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "stop"},
                        headers=api.headers("operator"), timeout=10)
    assert queued.status_code == 202
    api.store.finish_run("live-1", "completed")
    assert [a.id for a in api.store.actions("live-1", status="pending")] == []  # nothing will ever settle it


def test_concurrent_long_polls_do_not_multiply_store_reads(api: LiveAPI) -> None:
    queued = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "pause"},
                        headers=api.headers("operator"), timeout=10).json()
    reads = {"n": 0}
    original = api.store.get_action

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads["n"] += 1
        return original(*args, **kwargs)

    api.store.get_action = counting  # type: ignore[method-assign]
    waiters = 40

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=waiters + 5)
        async with httpx.AsyncClient(base_url=api.url, headers=api.headers(), timeout=30, limits=limits) as http:
            answers = await asyncio.gather(*[http.get(f"/api/v1/runs/live-1/actions/{queued['id']}?wait_s=2")
                                             for _ in range(waiters)])
        return [a.status_code for a in answers]

    codes = asyncio.run(flood())
    assert set(codes) <= {200, 429, 503}
    assert reads["n"] <= waiters + 10, f"{reads['n']} store reads for {waiters} waiters of 2 s"


def test_a_long_poll_ends_when_its_token_is_revoked(api: LiveAPI) -> None:
    queued = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "pause"},
                        headers=api.headers("operator"), timeout=10).json()
    token = api.token("viewer", subject="stolen")
    answer: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: answer.setdefault("r", httpx.get(
        api.url + f"/api/v1/runs/live-1/actions/{queued['id']}?wait_s=2", headers=bearer(token), timeout=10)))
    worker.start()
    time.sleep(0.5)
    api.store.revoke_token(claims_of(token)["jti"])
    worker.join()
    assert answer["r"].status_code == 401  # today: 200 with the action, 1.5 s after the revocation


def test_a_refused_privacy_weakening_request_is_recorded_with_who_asked(
    shared: LiveAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    answer = httpx.post(shared.url + "/api/v1/runs/central-1/actions", json={"action": "set_rule", "rule": "median"},
                        headers=bearer(shared.token("operator", subject="mallory-409")), timeout=10)
    assert answer.status_code == 409
    assert "mallory-409" in caplog.text  # neither the store nor the server's log says who tried


def test_an_action_names_the_token_that_asked(api: LiveAPI) -> None:
    first = api.token("operator", subject="alice")
    api.token("operator", subject="alice")  # alice's second token (say, the laptop that was stolen)
    action = httpx.post(api.url + "/api/v1/runs/live-1/actions", json={"action": "pause"}, headers=bearer(first),
                        timeout=10).json()
    assert claims_of(first)["jti"][:8] in json.dumps(action)


def test_no_answer_reveals_where_the_store_lives(shared: LiveAPI) -> None:
    folder = str(shared.folder)  # type: ignore[attr-defined]
    ready = httpx.get(shared.url + "/api/v1/ready", timeout=10)
    missing = httpx.get(shared.url + "/api/v1/runs/nope", headers=shared.headers(), timeout=10)
    assert folder not in ready.text, ready.text
    assert folder not in missing.text, missing.text


def test_the_docs_page_cannot_be_framed_and_runs_scripts_only_from_its_own_cdn(shared: LiveAPI) -> None:
    """Swagger UI's assets come from cdn.jsdelivr.net (FastAPI's page); the CSP allows that origin and no other,
    and `fedapp serve --no-docs` turns the page off where that CDN is not trusted."""
    page = httpx.get(shared.url + "/docs", timeout=10)
    policy = page.headers.get("content-security-policy", "")
    assert page.headers.get("x-frame-options") == "DENY" and "frame-ancestors 'none'" in policy
    script_src = next(p for p in policy.split(";") if p.strip().startswith("script-src")).split()[1:]
    assert set(script_src) <= {"'self'", "'unsafe-inline'", "https://cdn.jsdelivr.net"}


def test_serve_refuses_plain_http_off_loopback_without_an_explicit_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import fedapp.api.server
    from fedapp.cli import app

    served: list[str] = []
    monkeypatch.setattr(fedapp.api.server, "serve", lambda *a, **k: served.append(k["host"]))
    monkeypatch.setenv("FEDAPP_API_SECRET_FILE", str(tmp_path / "secret"))
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--store", f"sqlite:///{tmp_path / 's.db'}"])
    assert "clear text" in result.output  # the warning is there ...
    assert served == [], "bearer tokens would cross the network in clear text"  # ... and it serves anyway
