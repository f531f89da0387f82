"""The control plane's FastAPI application: versioned JSON over the run store, actions, metrics, the dashboard.

Every route is a thin adapter: reads come from :class:`fedapp.api.views.RunViews`,
an action is checked by :mod:`fedapp.control.actions` and queued in the store
(the ServerApp applies it at its next round boundary), tokens are checked by
:class:`fedapp.api.auth.TokenVerifier`. The endpoints and shapes are listed in
``docs/control_plane.md`` and in the generated OpenAPI schema (``/openapi.json``).

Errors are answered, never raised into the server: an unknown run is 404, a
store that cannot be reached 503, a malformed body or id 422, a request the
run's configuration cannot honour 409 with the reason, a body larger than
:data:`MAX_BODY_BYTES` 413; anything unexpected is a 500 with no detail (the
traceback goes to the server's log only).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (local aliases) at definition.
import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from fedapp import __version__
from fedapp.api.auth import AuthError, Identity, TokenVerifier
from fedapp.api.views import RunViews, json_bytes, run_config
from fedapp.control.actions import ACTION_KINDS, ActionError, action_params, refusal, settings_after
from fedapp.store.db import RunStore, StoreError, UnknownRunError
from fedapp.store.records import ActionRecord

LOGGER = logging.getLogger("fedapp.api")
STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024
MAX_WAIT_S = 60.0
MAX_WAITS_PER_TOKEN = 4
IDENTITY = "fedapp.identity"  # where the guard leaves the checked identity in the request's state
# Answered without a token: liveness and readiness, the dashboard's files (they hold no data) and the schema.
OPEN_PATHS = frozenset({"/", "/api/v1/health", "/api/v1/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
RunId = Annotated[str, PathParam(min_length=1, max_length=255, pattern=r"^[\w.:-]+$")]
ActionId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_BASE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                 (b"cache-control", b"no-store"), (b"x-frame-options", b"DENY"))
_DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
             "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
             "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = (*_BASE_HEADERS, (b"content-security-policy", _CSP.encode()))
_DOCS_HEADERS = (*_BASE_HEADERS, (b"content-security-policy", _DOCS_CSP.encode()))  # Swagger UI comes from its CDN


class ActionRequest(BaseModel):
    """An operator's request; which fields an action takes is checked by :func:`fedapp.control.actions.action_params`."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["block", "unblock", "set_rule", "set_clients_per_round", "pause", "resume", "stop"]
    client: str | None = Field(default=None, min_length=1, max_length=40, description="a client label, e.g. 3 or node-123")
    rule: str | None = Field(default=None, max_length=32, description="fedavg, krum, multikrum, trimmedmean, median")
    clients_per_round: int | None = Field(default=None, ge=1, le=1_000_000, strict=True)  # JSON true is not 1
    reason: str = Field(default="", max_length=500, description="why, for the audit log")


def create_app(
    store: RunStore,
    verifier: TokenVerifier,
    *,
    audit_public_key: Any = None,
    cache_s: float = 1.0,
    docs: bool = True,
) -> FastAPI:
    """The application over ``store``; tokens are checked by ``verifier``.

    ``docs`` serves the OpenAPI page at ``/docs`` (Swagger UI, whose script and
    style come from cdn.jsdelivr.net); ``/openapi.json`` is always served.
    """
    assert len(ACTION_KINDS) == len(ActionRequest.model_fields["action"].annotation.__args__)  # type: ignore[union-attr]
    views = RunViews(store, cache_s=cache_s)
    app = FastAPI(
        title="fedapp control plane", version=__version__,
        description="Runs, rounds, clients, privacy, audit and operators' actions of fedapp's run store.",
        docs_url="/docs" if docs else None, redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False)
    waits = _WaitLimit(MAX_WAITS_PER_TOKEN)

    # async: a plain ``def`` dependency would cost every request a hop to the thread pool
    async def identity(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Identity:
        checked = request.scope.get("state", {}).get(IDENTITY)  # the guard checked it before reading the body
        if checked is not None:
            return checked  # type: ignore[no-any-return]
        return await run_in_threadpool(verifier.verify, credentials.credentials if credentials else None)

    async def operator(who: Annotated[Identity, Depends(identity)]) -> Identity:
        return TokenVerifier.require(who, "operator")

    async def cached_json(key: Any, compute: Any) -> Response:
        """The read model's JSON bytes, from the cache on the event loop; computed in the thread pool on a miss.

        Serialising once per cache period (not per request, and without FastAPI's
        generic encoder) is what keeps fifty pollers cheap for the training run.
        """
        body = views.cache.peek(("json", key))
        if body is None:
            body = await run_in_threadpool(views.cache.get, ("json", key), lambda: json_bytes(compute()))
        return Response(body, media_type="application/json")

    Viewer = Annotated[Identity, Depends(identity)]
    Operator = Annotated[Identity, Depends(operator)]
    _install_handlers(app)
    v1 = APIRouter(prefix="/api/v1")

    @v1.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        """Liveness: the process answers (no token needed, nothing read)."""
        return {"status": "ok", "version": __version__}

    @v1.get("/ready", tags=["service"])
    def ready() -> JSONResponse:
        """Readiness: the run store answers (no token needed)."""
        try:
            store.list_runs(limit=1)
        except StoreError as err:  # the detail names the store: for the server's log, not an anonymous caller
            LOGGER.warning("not ready: %s", err)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @v1.get("/whoami", tags=["service"])
    def whoami(who: Viewer) -> dict[str, Any]:
        """The caller's subject, role and token expiry."""
        return {"subject": who.subject, "role": who.role, "expires_at": who.expires_at}

    @v1.get("/runs", tags=["runs"])
    async def runs(who: Viewer, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Response:
        """Runs, newest first: ``{"runs": [RunSummary]}``."""
        return await cached_json(("runs", limit), lambda: views.runs(limit))

    @v1.get("/runs/{run_id}", tags=["runs"])
    async def run(run_id: RunId, who: Viewer) -> Response:
        """One run with its configuration: ``RunSummary`` plus ``config``."""
        return await cached_json(("run", run_id), lambda: views.run(run_id))

    @v1.get("/runs/{run_id}/rounds", tags=["runs"])
    async def rounds(run_id: RunId, who: Viewer) -> Response:
        """The rounds the run's model descends from, with their metrics."""
        return await cached_json(("rounds", run_id), lambda: views.rounds(run_id))

    @v1.get("/runs/{run_id}/clients", tags=["runs"])
    async def clients(run_id: RunId, who: Viewer) -> Response:
        """Every client: status, reputation, anomaly score, epsilon against budget, refusals."""
        return await cached_json(("clients", run_id), lambda: views.clients(run_id))

    @v1.get("/runs/{run_id}/privacy", tags=["privacy"])
    async def privacy(run_id: RunId, who: Viewer) -> Response:
        """Per-client and central/distributed epsilon over rounds; budget exhaustion."""
        return await cached_json(("privacy", run_id), lambda: views.privacy(run_id))

    @v1.get("/runs/{run_id}/events", tags=["runs"])
    def events(
        run_id: RunId, who: Viewer,
        after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> dict[str, Any]:
        """Events after id ``after`` (the latest ``limit`` when 0)."""
        return views.events(run_id, after, limit)

    @v1.get("/runs/{run_id}/audit", tags=["audit"])
    def audit(run_id: RunId, who: Viewer) -> dict[str, Any]:
        """The audit chain checked against the head the store recorded (and the pinned key, if the server has one)."""
        return views.audit(run_id, audit_public_key)

    @v1.get("/runs/{run_id}/report", tags=["audit"])
    def report(run_id: RunId, who: Viewer) -> dict[str, Any]:
        """The compliance report: threat model, privacy spent per client, participants, refusals, audit."""
        return _report(run_id)

    @v1.get("/runs/{run_id}/report.html", tags=["audit"], response_class=HTMLResponse)
    def report_html(run_id: RunId, who: Viewer) -> HTMLResponse:
        """The compliance report as a printable page."""
        from fedapp.api.compliance import render_html

        return HTMLResponse(render_html(_report(run_id)))

    def _report(run_id: str) -> dict[str, Any]:
        from fedapp.api.compliance import build_report

        def compute() -> dict[str, Any]:
            export = store.export(run_id)
            actions = [asdict(a) for a in store.actions(run_id)]
            return build_report(export, audit=views.audit(run_id, audit_public_key), actions=actions)

        return views.cache.get(("report", run_id), compute)

    @v1.get("/runs/{run_id}/actions", tags=["actions"])
    def actions(run_id: RunId, who: Viewer) -> dict[str, Any]:
        """Operators' requests and what the ServerApp made of them."""
        return {"run_id": run_id, "actions": [asdict(a) for a in store.actions(run_id)]}

    @v1.get("/runs/{run_id}/actions/{action_id}", tags=["actions"])
    async def action(
        request: Request, run_id: RunId, action_id: ActionId, who: Viewer,
        wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S, allow_inf_nan=False)] = 0.0,
    ) -> dict[str, Any]:
        """One request; waits up to ``wait_s`` seconds for the ServerApp to settle it.

        At most :data:`MAX_WAITS_PER_TOKEN` waits per token at a time (429 beyond), and
        the token is checked again on every poll, so a revoked token's wait ends at once.
        """
        deadline = time.monotonic() + wait_s
        token = request.headers.get("authorization", "").partition(" ")[2]
        async with waits.slot(who.token_id if wait_s > 0 else None):
            while True:
                found = await run_in_threadpool(store.get_action, run_id, action_id)
                if found is None:
                    raise UnknownRunError(f"no action {action_id} of run {run_id!r}")
                if found.status != "pending" or time.monotonic() >= deadline:
                    return asdict(found)
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                await run_in_threadpool(verifier.verify, token)

    @v1.post("/runs/{run_id}/actions", tags=["actions"], status_code=202)
    def request_action(run_id: RunId, body: ActionRequest, who: Operator) -> dict[str, Any]:
        """Queue a request; the ServerApp applies it at the next round boundary (409 with the reason when it cannot)."""
        params = action_params(body.action, client=body.client, rule=body.rule, clients_per_round=body.clients_per_round)
        record = store.get_run(run_id)
        if record.status != "running":
            raise _Conflict(f"run {run_id} is {record.status}; actions apply only to a running run")
        cfg = run_config(record)
        if cfg is None:
            raise _Conflict(f"run {run_id} was started by another fedapp version whose configuration this one cannot read")
        applied = [(a.action, a.params) for a in store.actions(run_id, status="applied")]
        why = refusal(cfg, settings_after(cfg, applied), body.action, params)
        if why is None and body.action == "block":
            known = {c["client"] for c in views.clients(run_id)["clients"]}
            if params["client"] not in known and not str(params["client"]).startswith("node-"):
                why = f"client {params['client']} has not taken part in run {run_id}"
        request = ActionRecord(
            run_id=run_id, action=body.action, params=params, requested_by=who.subject, token_id=who.token_id,
            requested_at=time.time(), reason=body.reason,
        )
        if why is not None:  # on record too: an attempt to weaken a run's protection leaves a trace
            store.add_action(dataclasses.replace(request, status="refused", applied_at=time.time(), result=why))
            LOGGER.warning("refused %s (%s, token %s): %s %s on run %s: %s", who.subject, who.role, who.token_id,
                           body.action, params, run_id, why)
            raise _Conflict(why)
        queued = store.add_action(request)
        LOGGER.info("%s (%s, token %s) requested %s %s on run %s", who.subject, who.role, who.token_id, body.action,
                    params, run_id)
        return asdict(queued)

    app.include_router(v1)
    app.add_middleware(_Guard, verifier=verifier)

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics(who: Viewer) -> Response:
        """Prometheus text format: round, accuracy, loss, clients sampled/refused/quarantined, epsilon, round time."""
        from fedapp.api.prometheus import render_metrics

        body, content_type = views.cache.get("metrics", lambda: render_metrics(store))
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


class _Conflict(Exception):
    """The request is well formed but the run cannot take it now (409, with the reason)."""


def _install_handlers(app: FastAPI) -> None:
    """Map fedapp's errors to status codes (the guard bounds bodies and sets the security headers)."""

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, err: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=headers)

    @app.exception_handler(UnknownRunError)
    async def unknown(_: Request, err: UnknownRunError) -> JSONResponse:
        return JSONResponse({"detail": str(err).split(" in the store at ")[0]}, status_code=404)  # not where the store is

    @app.exception_handler(StoreError)
    async def store_error(request: Request, err: StoreError) -> JSONResponse:
        if "actions apply only to a running run" in str(err):  # the run ended between the check and the insert
            return JSONResponse({"detail": str(err)}, status_code=409)
        LOGGER.warning("run store error answering %s %s: %s", request.method, request.url.path, err)
        return JSONResponse({"detail": "the run store is unavailable; try again"}, status_code=503)

    @app.exception_handler(_TooManyWaits)
    async def too_many_waits(_: Request, err: _TooManyWaits) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": "5"})

    @app.exception_handler(ActionError)
    async def bad_action(_: Request, err: ActionError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(_Conflict)
    async def conflict(_: Request, err: _Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in err.errors()]
        return JSONResponse({"detail": "; ".join(problems)[:1000]}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        LOGGER.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (see the server's log)"}, status_code=500)



class _TooManyWaits(Exception):
    """A token already holds its share of long-polls (429)."""


class _WaitLimit:
    """At most ``per_token`` concurrent long-polls per token, so one caller cannot tie up the server's polling."""

    def __init__(self, per_token: int) -> None:
        self.per_token = per_token
        self._held: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, token_id: str | None) -> AsyncIterator[None]:
        if token_id is None:  # no wait, no slot
            yield
            return
        if self._held.get(token_id, 0) >= self.per_token:  # one event loop: no lock needed between check and add
            raise _TooManyWaits(f"at most {self.per_token} waiting requests per token; retry without wait_s or later")
        self._held[token_id] = self._held.get(token_id, 0) + 1
        try:
            yield
        finally:
            self._held[token_id] -= 1
            if not self._held[token_id]:
                del self._held[token_id]


class _Guard:
    """ASGI middleware: the token is checked, then the body read (at most :data:`MAX_BODY_BYTES`), before any route.

    Why not only FastAPI dependencies: FastAPI reads and parses a request's body
    before it solves the route's dependencies, so without this an anonymous
    caller could make the server buffer an unbounded (chunked) body, and a
    malformed body would be answered 422 before the missing token 401.
    """

    def __init__(self, app: Any, verifier: TokenVerifier) -> None:
        self.app, self.verifier = app, verifier

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        security = _DOCS_HEADERS if path.startswith("/docs") else _HEADERS

        async def send_secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k, v) for k, v in security if k not in present)]
            await send(message)

        if path not in OPEN_PATHS and not path.startswith("/static/"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            token = token if scheme.lower() == "bearer" else ""
            try:  # a token checked less than a second ago needs no thread and no store lookup
                who = self.verifier.remembered(token) or await run_in_threadpool(self.verifier.verify, token)
            except AuthError as err:
                extra = [(b"www-authenticate", b"Bearer")] if err.status == 401 else []
                await _send_json(send_secured, err.status, {"detail": err.detail}, extra)
                return
            scope.setdefault("state", {})[IDENTITY] = who
        body = bytearray()
        more = scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _send_json(send_secured, 413, {"detail": f"request body larger than {MAX_BODY_BYTES} bytes"})
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_secured)


async def _send_json(send: Any, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})
