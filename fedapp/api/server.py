"""``fedapp serve``: the control plane on uvicorn, over HTTPS when given a certificate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedapp.api.auth import TokenVerifier, load_secret, secret_file
from fedapp.store.db import RunStore


def build_app(store_url: str, *, secret_path: str | Path | None = None, audit_public_key: Any = None,
              cache_s: float = 1.0, docs: bool = True) -> Any:
    """The FastAPI application over the store at ``store_url``, with the API secret at ``secret_path``.

    The secret is created (mode 0600) when missing, so a first ``fedapp serve``
    works; tokens come from ``fedapp tokens create`` with the same secret file.
    """
    from fedapp.api.app import create_app

    store = RunStore(store_url, retries=2, timeout_s=2.0)
    secret = load_secret(secret_file(secret_path), create=True)
    return create_app(store, TokenVerifier(store, secret), audit_public_key=audit_public_key, cache_s=cache_s, docs=docs)


def serve(
    store_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    secret_path: str | Path | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    audit_public_key: Any = None,
    log_level: str = "info",
    docs: bool = True,
    max_connections: int = 256,
) -> None:
    """Serve until interrupted. TLS needs both ``certfile`` and ``keyfile`` (PEM)."""
    import uvicorn

    if (certfile is None) != (keyfile is None):
        raise ValueError("HTTPS needs both --certfile and --keyfile")
    app = build_app(store_url, secret_path=secret_path, audit_public_key=audit_public_key, docs=docs)
    logging.getLogger("fedapp.api").setLevel(log_level.upper())
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=True, server_header=False,
        ssl_certfile=str(certfile) if certfile else None, ssl_keyfile=str(keyfile) if keyfile else None,
        timeout_graceful_shutdown=5, limit_concurrency=max_connections,  # beyond it: 503, not a stalled server
    )
