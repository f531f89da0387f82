"""API tokens: signed, expiring, revocable, with a role (viewer reads, operator also acts).

Tokens are JWTs (PyJWT, HS256) signed with a secret kept in a file only the
operator's account can read (``0600``). Each token's id (``jti``), subject, role
and expiry are also recorded in the run store, and a token is honoured only
while that record exists and is not revoked: signature and expiry prove the
token was issued by whoever holds the secret, the record lets an operator take
one back before it expires (``fedapp tokens revoke``). Neither the secret nor a
token is ever written to the store or a log.

Threat model: an attacker on the network or with a stolen *expired*, *revoked*
or *viewer* token cannot read (401) or act (403); anyone with the secret file
can mint tokens, so the file is the root of trust (keep it with the run
store's credentials, not in the output folder that runs share).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from fedapp.store.db import RunStore, StoreError
from fedapp.store.records import ROLES, TokenRecord

SECRET_FILE_ENV = "FEDAPP_API_SECRET_FILE"
DEFAULT_SECRET_FILE = Path("~/.config/fedapp/api-secret")
ALGORITHM = "HS256"
ISSUER = "fedapp"
AUDIENCE = "fedapp-api"
MAX_LIFETIME_S = 366 * 86400
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AuthError(Exception):
    """A request's credentials are refused; ``status`` is 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class Identity:
    """Who is calling, as the verified token says."""

    subject: str
    role: str
    token_id: str
    expires_at: float


def parse_duration(text: str) -> float:
    """``"12h"``, ``"30m"``, ``"7d"``, ``"90s"`` in seconds; ValueError with the accepted form otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"duration {text!r} must be a number with a unit s, m, h or d (e.g. 12h)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 < seconds <= MAX_LIFETIME_S:
        raise ValueError(f"a token lives more than 0 s and at most 366 d, not {text!r}")
    return seconds


def secret_file(path: str | Path | None = None) -> Path:
    """``path``, else ``$FEDAPP_API_SECRET_FILE``, else ``~/.config/fedapp/api-secret``."""
    chosen = path or os.environ.get(SECRET_FILE_ENV) or DEFAULT_SECRET_FILE
    return Path(chosen).expanduser().resolve()


def load_secret(path: Path, *, create: bool = False) -> bytes:
    """The signing secret; with ``create``, a new random one is written (mode 0600) when none exists.

    A secret readable by other accounts is refused: anyone who reads it can mint an operator token.
    """
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no API secret at {path}: create one with `fedapp tokens create`")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"API secret {path} is readable by other accounts (mode {mode:o}); chmod 600 it")
    secret = path.read_text().strip().encode()
    if len(secret) < 32:
        raise ValueError(f"API secret {path} is too short (fewer than 32 characters)")
    return secret


def issue_token(store: RunStore, secret: bytes, *, subject: str, role: str, lifetime_s: float) -> tuple[str, TokenRecord]:
    """A new signed token and its store record (the token itself is returned once and kept nowhere)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not subject or len(subject) > 200:
        raise ValueError("subject (who the token is for) must be 1 to 200 characters")
    now = time.time()
    record = TokenRecord(token_id=uuid.uuid4().hex, subject=subject, role=role, issued_at=now,
                         expires_at=now + lifetime_s)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "role": role, "jti": record.token_id,
              "iat": int(now), "exp": int(record.expires_at)}
    token = jwt.encode(claims, secret, algorithm=ALGORITHM)
    store.add_token(record)
    return token, record


def token_id_of(token: str) -> str:
    """The ``jti`` of a token without checking its signature (to revoke a token one holds)."""
    try:
        return str(jwt.decode(token, options={"verify_signature": False})["jti"])
    except (jwt.PyJWTError, KeyError) as err:
        raise ValueError("not a fedapp API token") from err


class TokenVerifier:
    """Checks a bearer token: signature, issuer, audience, expiry, then its store record (not revoked).

    A token that passed is remembered for ``recheck_s`` seconds (never past its
    expiry), so fifty dashboards polling every second do not cost fifty store
    lookups a second: a revocation takes effect within ``recheck_s``.
    """

    def __init__(self, store: RunStore, secret: bytes, *, leeway_s: float = 0.0, recheck_s: float = 1.0,
                 max_remembered: int = 4096) -> None:
        self.store, self._secret, self.leeway_s = store, secret, leeway_s
        self.recheck_s, self.max_remembered = recheck_s, max_remembered
        self._passed: dict[str, tuple[float, Identity]] = {}  # token -> (recheck at, identity)

    def __repr__(self) -> str:  # never the secret
        return f"TokenVerifier({self.store!r})"

    def remembered(self, token: str | None) -> Identity | None:
        """The identity of a token that passed less than ``recheck_s`` ago and has not expired, else None."""
        hit = self._passed.get(token or "")
        now = time.time()
        if hit is None or hit[0] <= time.monotonic() or hit[1].expires_at <= now:
            return None
        return hit[1]

    def verify(self, token: str | None) -> Identity:
        known = self.remembered(token)
        if known is not None:
            return known
        identity = self._check(token)
        if self.recheck_s > 0:
            if len(self._passed) >= self.max_remembered:
                self._passed.clear()
            self._passed[token or ""] = (time.monotonic() + self.recheck_s, identity)
        return identity

    def _check(self, token: str | None) -> Identity:
        if not token:
            raise AuthError(401, "missing bearer token")
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER, leeway=self.leeway_s,
                options={"require": ["exp", "iat", "jti", "sub", "role", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.PyJWTError:
            raise AuthError(401, "invalid token") from None
        try:
            record = self.store.get_token(str(claims["jti"]))
        except StoreError:
            raise AuthError(503, "the run store cannot check the token now") from None
        if record is None or record.role != claims["role"] or record.subject != claims["sub"]:
            raise AuthError(401, "unknown token")
        if record.revoked_at is not None:
            raise AuthError(401, "token revoked")
        if record.expires_at < time.time() - self.leeway_s:
            raise AuthError(401, "token expired")
        return Identity(subject=record.subject, role=record.role, token_id=record.token_id, expires_at=record.expires_at)

    @staticmethod
    def require(identity: Identity, role: str) -> Identity:
        """``identity`` if its role includes ``role`` (operator includes viewer), else 403."""
        if role == "operator" and identity.role != "operator":
            raise AuthError(403, "operator role required")
        return identity
