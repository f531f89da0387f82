"""A real uvicorn server on a loopback port, for tests of ``fedapp serve``'s application.

The server runs in a thread of the test process (uvicorn's own ``Server``, real
sockets and HTTP parsing), so a test starts it in well under a second; the
application object is the one ``fedapp serve`` builds.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from fedapp.api.app import create_app
from fedapp.api.auth import TokenVerifier, issue_token, load_secret
from fedapp.store.db import RunStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveAPI:
    """``with LiveAPI(store_url, secret_file) as api:`` serves until the block ends; ``api.url``, ``api.token(role)``."""

    def __init__(self, store_url: str, secret_file: Path, *, cache_s: float = 0.0, ssl: dict[str, str] | None = None,
                 audit_public_key: Any = None) -> None:
        self.store = RunStore(store_url, retries=2)
        self.secret = load_secret(secret_file, create=True)
        self.verifier = TokenVerifier(self.store, self.secret)  # the production setting (re-check after 1 s)
        self.app = create_app(self.store, self.verifier, cache_s=cache_s, audit_public_key=audit_public_key)
        self.port = free_port()
        scheme = "https" if ssl else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                **({"ssl_certfile": ssl["certfile"], "ssl_keyfile": ssl["keyfile"]} if ssl else {}))
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> "LiveAPI":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.store.close()

    def token(self, role: str, *, subject: str | None = None, lifetime_s: float = 3600) -> str:
        token, _ = issue_token(self.store, self.secret, subject=subject or f"test-{role}", role=role,
                               lifetime_s=lifetime_s)
        return token

    def headers(self, role: str = "viewer") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role)}"}
