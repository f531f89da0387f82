"""Paillier key pair, key files, and obfuscators ``r^n mod n^2`` (online, CRT, pooled).

phe generates the keys; the key files, the key id, the CRT obfuscator and the
pool are written here (see :mod:`fedapp.crypto` for why the CRT path has
exactly phe's distribution).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

import gmpy2
import numpy as np
from phe import paillier

from fedapp.crypto.fixedpoint import DEFAULT_KEY_BITS

# Flower's logger by name, without importing Flower here.
log = logging.getLogger("flwr").log

PUBLIC_KEY_FILE = "paillier_public.json"
PRIVATE_KEY_FILE = "paillier_private.json"


def key_fingerprint(n: int) -> str:
    """Short public id of a key: the first 16 hex digits of SHA-256 of ``n``."""
    n = int(n)
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()[:16]


class PublicKey:
    """Paillier public key (phe's) plus what vectors need: ``n^2``, id, byte sizes."""

    def __init__(self, n: int) -> None:
        self.phe = paillier.PaillierPublicKey(int(n))
        self.n = gmpy2.mpz(n)
        self.nsquare = self.n * self.n
        self.bits = int(self.n.bit_length())
        self.key_id = key_fingerprint(int(n))
        self.ciphertext_bytes = (int(self.nsquare.bit_length()) + 7) // 8

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.bits}, key_id={self.key_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.n == other.n

    def __hash__(self) -> int:
        return hash(self.key_id)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "paillier-public", "key_id": self.key_id, "bits": self.bits, "n": format(int(self.n), "x")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PublicKey:
        if data.get("kind") != "paillier-public":
            raise ValueError(f"not a Paillier public key file (kind={data.get('kind')!r})")
        key = cls(int(data["n"], 16))
        if key.key_id != data.get("key_id"):
            raise ValueError(f"public key file corrupt: key_id {data.get('key_id')} != fingerprint {key.key_id}")
        return key


class PrivateKey:
    """Paillier private key (phe's) plus the CRT constants for fast obfuscators.

    Only key-holding clients construct this; server-side objects take a
    :class:`PublicKey` and :func:`assert_no_private_key` checks they hold none.
    """

    def __init__(self, public_key: PublicKey, p: int, q: int) -> None:
        if gmpy2.mpz(p) * gmpy2.mpz(q) != public_key.n:
            raise ValueError("private key does not match public key (p*q != n)")
        self.public_key = public_key
        self.phe = paillier.PaillierPrivateKey(public_key.phe, int(p), int(q))
        self._p, self._q = gmpy2.mpz(p), gmpy2.mpz(q)
        self._p2, self._q2 = self._p * self._p, self._q * self._q
        self._q2_inv = gmpy2.invert(self._q2, self._p2)

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def __repr__(self) -> str:
        return f"PrivateKey(bits={self.public_key.bits}, key_id={self.key_id})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "paillier-private", "key_id": self.key_id, "p": format(int(self._p), "x"), "q": format(int(self._q), "x")}

    @classmethod
    def from_dict(cls, data: dict[str, Any], public_key: PublicKey) -> PrivateKey:
        if data.get("kind") != "paillier-private":
            raise ValueError(f"not a Paillier private key file (kind={data.get('kind')!r})")
        if data.get("key_id") != public_key.key_id:
            raise ValueError(f"private key {data.get('key_id')} does not belong to public key {public_key.key_id}")
        return cls(public_key, int(data["p"], 16), int(data["q"], 16))

    def crt_obfuscators(self, count: int) -> list[int]:
        """``count`` fresh obfuscators ``r^n mod n^2`` via the factorisation (see module doc)."""
        p, q, p2, q2, inv = self._p, self._q, self._p2, self._q2, self._q2_inv
        out = []
        for _ in range(count):
            xp = gmpy2.powmod(1 + secrets.randbelow(int(p) - 1), p, p2)
            xq = gmpy2.powmod(1 + secrets.randbelow(int(q) - 1), q, q2)
            out.append(xq + q2 * (((xp - xq) * inv) % p2))
        return out


def generate_keypair(bits: int = DEFAULT_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair (phe's generator). Below 2048 bits only for tests: it is not secure."""
    if bits < 256 or bits % 8:
        raise ValueError(f"key bits must be a multiple of 8 and >= 256, got {bits}")
    if bits < DEFAULT_KEY_BITS:
        log(logging.WARNING, "Paillier key of %d bits: insecure, for tests only", bits)
    pub, priv = paillier.generate_paillier_keypair(n_length=bits)
    public_key = PublicKey(pub.n)
    return public_key, PrivateKey(public_key, priv.p, priv.q)


def save_keypair(directory: str | Path, public_key: PublicKey, private_key: PrivateKey | None = None) -> Path:
    """Write the public key file and, if given, the private key file (mode 0600) to ``directory``.

    The two files are separate so that the server's machine gets only the first.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PUBLIC_KEY_FILE).write_text(json.dumps(public_key.to_dict()))
    if private_key is not None:
        path = directory / PRIVATE_KEY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(private_key.to_dict()))
    log(logging.INFO, "Paillier key %s written to %s (private: %s)", public_key.key_id, directory, private_key is not None)
    return directory


def load_public_key(directory: str | Path) -> PublicKey:
    """The public key from ``directory`` (all the server ever needs)."""
    return PublicKey.from_dict(json.loads((Path(directory) / PUBLIC_KEY_FILE).read_text()))


def load_private_key(directory: str | Path) -> PrivateKey:
    """The private key from ``directory``; clients only."""
    public_key = load_public_key(directory)
    return PrivateKey.from_dict(json.loads((Path(directory) / PRIVATE_KEY_FILE).read_text()), public_key)


def assert_no_private_key(obj: object, _depth: int = 0, _seen: set[int] | None = None) -> None:
    """Raise ``AssertionError`` if ``obj`` or anything reachable from its attributes is a private key.

    Server-side wrappers call this on themselves at construction; tests call it too.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen or _depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, (PrivateKey, paillier.PaillierPrivateKey)):
        raise AssertionError(f"server-side object holds a private key: {obj!r}")
    if isinstance(obj, (str, bytes, int, float, np.ndarray)) or obj is None:
        return
    children: Iterable[object]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        assert_no_private_key(child, _depth + 1, seen)


def _crt_worker(n: int, p: int, q: int, count: int) -> list[int]:
    """Process-pool entry: rebuild the key from its factors, return obfuscators as ints."""
    key = PrivateKey(PublicKey(n), p, q)
    return [int(x) for x in key.crt_obfuscators(count)]


def make_obfuscators(
    count: int, *, public_key: PublicKey, private_key: PrivateKey | None = None, workers: int = 1
) -> list[int]:
    """``count`` fresh obfuscators: CRT path when the private key is at hand, else phe's ``r^n mod n^2``.

    ``workers`` > 1 splits the work over processes (spawned; about 0.2 s to start).
    """
    if workers <= 1 or count < 4 * workers:
        return _public_obfuscators(int(public_key.n), count) if private_key is None else private_key.crt_obfuscators(count)
    chunks = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        if private_key is None:  # threshold-key clients: no factorisation, phe's path in every worker
            parts = pool.map(_public_worker, [int(public_key.n)] * workers, chunks)
        else:
            args = (int(public_key.n), int(private_key._p), int(private_key._q))
            parts = pool.map(_crt_worker, *zip(*[(*args, c) for c in chunks]))
        return [gmpy2.mpz(x) for part in parts for x in part]


def _public_obfuscators(n: int, count: int) -> list[int]:
    """phe's ``r^n mod n^2`` with ``r`` uniform below ``n`` (the public-key path)."""
    key = PublicKey(n)
    return [gmpy2.powmod(key.phe.get_random_lt_n(), key.n, key.nsquare) for _ in range(count)]


def _public_worker(n: int, count: int) -> list[int]:
    """Process-pool entry for :func:`_public_obfuscators`, returning plain ints."""
    return [int(x) for x in _public_obfuscators(n, count)]


class ObfuscatorPool:
    """Obfuscators computed ahead of time (between rounds), each used once.

    With a full pool, encryption is one multiplication modulo ``n^2`` per
    ciphertext. An obfuscator decrypts the ciphertext it was used for, so a pool
    is as secret as the private key: :meth:`save` writes mode 0600 and
    :meth:`take` removes what it hands out so nothing is ever reused.
    """

    def __init__(self, public_key: PublicKey, values: Iterable[int] = ()) -> None:
        self.key_id = public_key.key_id
        self._public_key = public_key
        self._values = [gmpy2.mpz(v) for v in values]

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ObfuscatorPool(key_id={self.key_id}, size={len(self)})"

    def fill(self, target: int, *, private_key: PrivateKey | None = None, workers: int = 1) -> int:
        """Top up to ``target`` obfuscators; returns how many were added."""
        missing = max(0, target - len(self._values))
        if missing:
            self._values.extend(
                make_obfuscators(missing, public_key=self._public_key, private_key=private_key, workers=workers)
            )
        return missing

    def take(self, count: int) -> list[int]:
        if count > len(self._values):
            raise ValueError(f"obfuscator pool holds {len(self._values)}, {count} requested")
        taken, self._values = self._values[:count], self._values[count:]
        return taken

    def save(self, path: str | Path) -> None:
        fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"key_id": self.key_id, "values": [format(int(v), "x") for v in self._values]}, fh)

    @classmethod
    def load(cls, path: str | Path, public_key: PublicKey) -> ObfuscatorPool:
        data = json.loads(Path(path).read_text())
        if data.get("key_id") != public_key.key_id:
            raise ValueError(f"obfuscator pool is for key {data.get('key_id')}, not {public_key.key_id}")
        return cls(public_key, (int(v, 16) for v in data["values"]))
