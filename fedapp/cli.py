"""``fedapp``: one command for every entry point (Typer, as Flower's own ``flwr`` CLI).

    fedapp run [HYDRA OVERRIDES...]        train (simulation engine or real processes)
    fedapp launch [--config F] [k=v ...]   real SuperLink + SuperNodes on this host (= fedapp-launch)
    fedapp keys generate|deal|show|pool|audit ...
    fedapp runs list | show RUN | export RUN [--format json|csv]
    fedapp resume RUN                      continue a killed run from its last checkpoint
    fedapp audit verify RUN                check the run's tamper-evident audit chain
    fedapp serve [--port 8080] [--certfile F --keyfile K]   the control plane (API, dashboard, /metrics)
    fedapp tokens create --role viewer|operator --expires 12h | revoke TOKEN_ID | list

A user mistake (unknown run, bad store URL, corrupt checkpoint, bad override)
is one line on stderr and exit code 2; a failed run exits 1.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from fedapp.store.settings import STORE_URL_ENV, masked_url, resolve_store_url

app = typer.Typer(
    name="fedapp", help="Federated learning on Flower with privacy you can prove.", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Runs recorded in the run store.", no_args_is_help=True)
audit_app = typer.Typer(help="The runs' tamper-evident audit logs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(audit_app, name="audit")
tokens_app = typer.Typer(help="Tokens of the control plane's API (fedapp serve).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
SecretOption = typer.Option(
    None, "--secret-file", help="the API's signing secret (default: $FEDAPP_API_SECRET_FILE or ~/.config/fedapp/api-secret)")

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
StoreOption = typer.Option("", "--store", help=f"run store URL (default: ${STORE_URL_ENV} or outputs/fedapp.db)")


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit (2: the request was wrong)."""
    typer.echo(f"fedapp: error: {message}", err=True)
    raise typer.Exit(code)


def _open_store(url: str, *, create: bool = False):  # type: ignore[no-untyped-def]
    from fedapp.store.db import RunStore, StoreError

    resolved = resolve_store_url(url)
    if not create and resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///"):]).exists():
        fail(f"no run store at {resolved} (run an experiment first, or pass --store URL)")
    try:
        return RunStore(resolved, retries=1)
    except StoreError as err:
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - a malformed URL raises from deep inside SQLAlchemy
        fail(f"cannot open the run store {masked_url(resolved)!r}: {str(err).splitlines()[0]}")


def _get_run(store, run_id: str):  # type: ignore[no-untyped-def]
    from fedapp.store.db import StoreError

    try:
        return store.get_run(run_id)
    except StoreError as err:
        fail(str(err))


# ---------------------------------------------------------------- entry points
@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def run(ctx: typer.Context) -> None:
    """Run an experiment with Hydra overrides (``+experiment=smoke num_rounds=3``; ``--help`` shows Hydra's help)."""
    from fedapp.runner import main as hydra_main

    sys.argv = ["fedapp run", *ctx.args]
    hydra_main()


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def launch(ctx: typer.Context) -> None:
    """Real SuperLink + SuperNodes on this host (same options as ``fedapp-launch``; ``--help`` lists them)."""
    from fedapp.deploy.cli import main as launch_main

    raise typer.Exit(launch_main(ctx.args))


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def keys(ctx: typer.Context) -> None:
    """Paillier keys (generate, deal, show, pool) and the operator's audit key (audit); ``--help`` lists them."""
    from fedapp.keys import main as keys_main

    try:
        code = keys_main(ctx.args)
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        code = int(exc.code or 0)
    raise typer.Exit(code)


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="the run to continue (see `fedapp runs list`)"),
    store: str = StoreOption,
) -> None:
    """Continue a killed or failed run from its last checkpoint, with its own config and round numbers."""
    from fedapp.config import ConfigError, ExperimentConfig
    from fedapp.runner import failed_run_errors, run_experiment_here, user_errors

    db = _open_store(store)
    record = _get_run(db, run_id)
    db.close()
    if record.status == "completed":
        fail(f"run {run_id} already completed all its rounds; nothing to resume")
    raw = dict(record.config)
    raw["store"] = {**raw.get("store", {}), "url": resolve_store_url(store), "resume": run_id, "run_id": ""}
    try:
        cfg = ExperimentConfig.from_dict(raw)
        summary = run_experiment_here(cfg)
    except ConfigError as err:
        fail(str(err))
    except user_errors() as err:
        fail(str(err))
    except failed_run_errors() as err:
        fail(f"run {run_id} failed: {str(err).splitlines()[0]}", code=1)
    typer.echo(json.dumps(summary, indent=2))
    if summary.get("status") == "failed":
        fail(f"run {run_id} failed: {summary.get('error', 'see the log')}", code=1)


# ---------------------------------------------------------------- runs
@runs_app.command("list")
def runs_list(
    store: str = StoreOption,
    limit: int = typer.Option(20, help="newest runs to show (0: all)"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
) -> None:
    """The runs in the store, newest first."""
    db = _open_store(store)
    records = db.list_runs(limit or None)
    db.close()
    if as_json:
        for r in records:
            typer.echo(json.dumps(_run_summary(r)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("run id", "name", "status", "round", "attempt", "started", "output")
    for r in records:
        table.add_row(
            r.run_id, r.name, r.status, f"{r.last_round}/{r.config.get('num_rounds', '?')}", str(r.attempt),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)), r.output_dir,
        )
    Console().print(table)


@runs_app.command("show")
def runs_show(run_id: str, store: str = StoreOption) -> None:
    """One run: status, rounds, client decisions, checkpoints."""
    db = _open_store(store)
    record = _get_run(db, run_id)
    rounds = db.rounds(run_id, effective_only=True)
    updates = db.updates(run_id)
    checkpoints = db.checkpoints(run_id)
    db.close()
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(json.dumps(_run_summary(record), indent=2))
    table = Table("round", "attempt", "clients", "test acc", "seconds", "bytes up", "bytes down")
    for r in rounds:
        acc = r.metrics.get("test_accuracy")
        table.add_row(str(r.round), str(r.attempt), str(len(r.participants)), "-" if acc is None else f"{acc:.4f}",
                      f"{r.ended_at - r.started_at:.2f}", str(r.bytes_up), str(r.bytes_down))
    console.print(table)
    console.print("client updates by status:", dict(Counter(u.status for u in updates)))
    if checkpoints:
        last = checkpoints[-1]
        console.print(f"last checkpoint: round {last.round}, {last.size_bytes} bytes, sha256 {last.sha256[:16]}..., {last.path}")


@runs_app.command("export")
def runs_export(
    run_id: str,
    store: str = StoreOption,
    fmt: str = typer.Option("json", "--format", help="json (everything) or csv (one row per client update)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="file to write (default: stdout)"),
) -> None:
    """Everything the store holds about one run, as JSON, or its client updates as CSV."""
    if fmt not in ("json", "csv"):
        fail(f"--format must be json or csv, got {fmt!r}")
    db = _open_store(store)
    _get_run(db, run_id)
    data = db.export(run_id)
    db.close()
    if fmt == "json":
        text = json.dumps(data, indent=2)
    else:
        buffer = io.StringIO()
        rows = data["updates"]
        columns = list(rows[0]) if rows else ["run_id", "round", "attempt", "client", "status", "reason"]
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text)


@runs_app.command("stop")
def runs_stop(
    run_id: str,
    store: str = StoreOption,
    reason: str = typer.Option("", "--reason", help="recorded in the audit log with who asked"),
) -> None:
    """Ask a running run to checkpoint and stop at its next round boundary (`fedapp resume` continues it)."""
    import getpass

    from fedapp.store.durable import STOP_FILE

    db = _open_store(store)
    record = _get_run(db, run_id)
    db.close()
    if record.status != "running":
        fail(f"run {run_id} is {record.status}, not running; nothing to stop")
    request = {"by": getpass.getuser(), "reason": reason, "time": time.time()}
    target = Path(record.output_dir) / STOP_FILE
    tmp = target.with_name(f".{STOP_FILE}.tmp")
    tmp.write_text(json.dumps(request))
    tmp.replace(target)
    typer.echo(f"stop requested for run {run_id}: it checkpoints and stops after the round in progress")


def _run_summary(r: Any) -> dict[str, Any]:
    return {
        "run_id": r.run_id, "name": r.name, "status": r.status, "last_round": r.last_round, "attempt": r.attempt,
        "config_hash": r.config_hash, "code_version": r.code_version, "started_at": r.started_at,
        "ended_at": r.ended_at, "error": r.error, "output_dir": r.output_dir, "audit_seq": r.audit_seq,
        "audit_head": r.audit_head,
    }


# ---------------------------------------------------------------- audit
@audit_app.command("verify")
def audit_verify(
    run_id: str,
    store: str = StoreOption,
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="the operator's audit_ed25519.pub (pins the signer)"),
    allow_unsigned_tail: bool = typer.Option(
        False, "--allow-unsigned-tail", help="accept entries after the last signed head (a run that crashed mid-round)"),
) -> None:
    """Check the run's audit chain, its recorded head and (with --public-key) its signature; exit 1 if it fails.

    The run store's head is only a second witness: whoever can edit the log may
    also be able to edit the store. With ``--public-key`` only what the operator's
    key signed counts: entries after the signed head are an *unsigned tail*
    (exit 1 unless ``--allow-unsigned-tail``), and a completed run must end with
    a signed ``run_end``.
    """
    from fedapp.store.audit import AuditError, SignedHead, head_path, load_public_key, verify_log
    from fedapp.store.durable import AUDIT_FILE

    db = _open_store(store)
    record = _get_run(db, run_id)
    db.close()
    try:
        key = load_public_key(public_key) if public_key else None
    except AuditError as err:
        fail(str(err))
    path = Path(record.output_dir) / AUDIT_FILE
    if not path.exists():
        fail(f"run {run_id} has no audit log at {path}", code=1)
    report = verify_log(path, expected_head=(record.audit_seq, record.audit_head), public_key=key, run_id=run_id)
    typer.echo(report.line())
    if not report.ok:
        raise typer.Exit(1)
    if key is not None:
        signed = SignedHead.from_dict(json.loads(head_path(path).read_text()))
        last = json.loads(path.read_text().splitlines()[-1]) if report.entries else {}
        if signed.seq < report.entries and not allow_unsigned_tail:
            typer.echo(f"FAIL: entries {signed.seq + 1}..{report.entries} come after the last signed head "
                       "(pass --allow-unsigned-tail for a run that crashed mid-round)")
            raise typer.Exit(1)
        if record.status == "completed" and (last.get("kind") != "run_end" or signed.seq != report.entries):
            typer.echo("FAIL: the run is recorded as completed but its log does not end with a signed run_end entry")
            raise typer.Exit(1)


# ------------------------------------------------------------- control plane
@app.command()
def serve(
    store: str = StoreOption,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    secret_file: Optional[Path] = SecretOption,
    certfile: Optional[Path] = typer.Option(None, "--certfile", help="TLS certificate (PEM); with --keyfile serves HTTPS"),
    keyfile: Optional[Path] = typer.Option(None, "--keyfile", help="TLS private key (PEM)"),
    audit_public_key: Optional[Path] = typer.Option(
        None, "--audit-public-key", help="the operator's audit_ed25519.pub: audit status then checks the signature"),
    log_level: str = typer.Option("info", "--log-level"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="the OpenAPI page at /docs (Swagger UI from its CDN)"),
    insecure_http: bool = typer.Option(
        False, "--insecure-http", help="allow plain HTTP on a non-loopback address (tokens would cross in clear)"),
) -> None:
    """Serve the control plane: JSON API (/api/v1, OpenAPI at /docs), dashboard at /, Prometheus at /metrics."""
    from fedapp.api.server import serve as run_server
    from fedapp.store.audit import load_public_key

    if (certfile is None) != (keyfile is None):
        fail("HTTPS needs both --certfile and --keyfile")
    for path in (certfile, keyfile, audit_public_key):
        if path is not None and not path.is_file():
            fail(f"no such file: {path}")
    if host not in ("127.0.0.1", "::1", "localhost") and certfile is None:
        if not insecure_http:
            fail(f"refusing plain HTTP on {host}: bearer tokens would cross the network in clear text; pass "
                 "--certfile/--keyfile (or --insecure-http behind a TLS-terminating proxy)")
        typer.echo(f"fedapp: warning: serving plain HTTP on {host} (--insecure-http)", err=True)
    db = _open_store(store, create=True)
    url = db.url
    db.close()
    try:
        key = load_public_key(audit_public_key) if audit_public_key else None
        run_server(resolve_store_url(store), host=host, port=port, secret_path=secret_file, certfile=certfile,
                   keyfile=keyfile, audit_public_key=key, log_level=log_level, docs=docs)
    except (OSError, ValueError) as err:
        fail(f"cannot serve the store {url}: {err}")


@tokens_app.command("create")
def tokens_create(
    role: str = typer.Option(..., "--role", help="viewer (reads) or operator (reads and acts)"),
    expires: str = typer.Option("12h", "--expires", help="lifetime: a number and s, m, h or d (at most 366d)"),
    subject: str = typer.Option("", "--subject", help="who it is for, recorded with every action (default: your user name)"),
    store: str = StoreOption,
    secret_file: Optional[Path] = SecretOption,
) -> None:
    """Issue a signed token; it is printed once and stored nowhere (the store keeps its id, role and expiry)."""
    import getpass

    from fedapp.api.auth import issue_token, load_secret, parse_duration
    from fedapp.api.auth import secret_file as resolve_secret

    try:
        lifetime = parse_duration(expires)
        secret = load_secret(resolve_secret(secret_file), create=True)
    except (OSError, ValueError) as err:
        fail(str(err))
    db = _open_store(store, create=True)
    try:
        token, record = issue_token(db, secret, subject=subject or getpass.getuser(), role=role, lifetime_s=lifetime)
    except ValueError as err:
        fail(str(err))
    finally:
        db.close()
    expiry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
    typer.echo(f"fedapp: {record.role} token {record.token_id} for {record.subject}, expires {expiry}", err=True)
    typer.echo(token)


@tokens_app.command("revoke")
def tokens_revoke(
    token: str = typer.Argument(..., help="the token's id (from `fedapp tokens list`) or the token itself"),
    store: str = StoreOption,
) -> None:
    """Refuse a token from now on, before it expires."""
    from fedapp.api.auth import token_id_of

    token_id = token if len(token) == 32 and all(c in "0123456789abcdef" for c in token) else None
    if token_id is None:
        try:
            token_id = token_id_of(token)
        except ValueError as err:
            fail(str(err))
    db = _open_store(store)
    record = db.revoke_token(token_id)
    db.close()
    if record is None:
        fail(f"no token {token_id} in the store")
    typer.echo(f"revoked {record.role} token {record.token_id} of {record.subject}")


@tokens_app.command("list")
def tokens_list(store: str = StoreOption) -> None:
    """Issued tokens: id, subject, role, expiry, revocation (never the tokens)."""
    db = _open_store(store)
    records = db.tokens()
    db.close()
    now = time.time()
    for r in records:
        state = "revoked" if r.revoked_at else ("expired" if r.expires_at < now else "valid")
        expiry = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.expires_at))
        typer.echo(f"{r.token_id}  {r.role:<8}  {state:<7}  expires {expiry} UTC  {r.subject}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
