"""A tamper-evident, append-only, signed audit log for one federated-learning run.

Threat model
------------
The adversary sits on the operator's side with write access to the output folder
(a compromised server host or an insider). He edits, deletes, inserts or reorders
entries, or cuts the tail of a run's log, to hide what happened: a refused client,
a quarantine, a privacy spend. Nothing stops a process that can write the file from
writing it; the log makes every such change *detectable*:

* each entry carries the SHA-256 of the previous one (a hash chain), and its own
  hash covers its sequence number and that link, so an edited, inserted, deleted
  or moved entry breaks the chain at the place of the change;
* the chain head (sequence number and hash) is recorded elsewhere: in the run
  store's database row and in each checkpoint. :func:`verify_log` takes those
  records as ``expected_head``, which catches a cut tail and a chain rewritten
  from the edit onwards (an attacker who re-hashes everything after his edit);
* the head is signed with an Ed25519 key that ``fedapp keys audit`` makes and the
  operator keeps (:func:`generate_audit_key`). The signature covers run id,
  sequence number and head (not the time of signing); it is checked against the
  operator's *pinned* public key, since a head file carries its own public key
  and an attacker can re-sign with a key of his own.

What it does NOT protect against:

* an adversary holding the signing key who rewrites the whole chain *and* every
  place the head was recorded (database row, checkpoints, head file);
* entries that were never written: a server that lies from the start writes a
  consistent chain of lies. The clients' own ledgers are the check on that;
* entries after the last recorded head. The store records the head at round
  boundaries, so a process that dies in between leaves entries nothing vouches
  for yet. :func:`verify_log` accepts them (``ok=True``) and says so in the
  report's ``note`` and ``covered``: such a tail can be cut, or forged entries
  appended to it, without detection. Sign and record the head often enough
  that this window stays small (every round boundary, and after ``run_end``);
* rolling back to an older genuine state: a log cut back to an old signed head,
  with the old head file put back, is caught only by a later head recorded
  elsewhere (the database row or a checkpoint), not by the signature alone.

One writer per log: :class:`AuditLog` is not safe for two processes appending to
the same file; it refuses to write when the file changed under it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.common import log

__all__ = [
    "EVENT_KINDS",
    "GENESIS",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "SignedHead",
    "VerifyReport",
    "entry_hash",
    "generate_audit_key",
    "head_message",
    "head_path",
    "load_public_key",
    "load_signing_key",
    "verify_log",
]

GENESIS = "0" * 64
EVENT_KINDS = frozenset({
    "run_start", "client_joined", "client_declined", "client_refused", "client_excluded", "client_quarantined",
    "client_released", "aggregation", "privacy_spend", "checkpoint", "resume", "admin_action", "run_end", "note",
})  # fmt: skip
PRIVATE_KEY_FILE = "audit_ed25519.pem"
PUBLIC_KEY_FILE = "audit_ed25519.pub"
_FIELDS = ("seq", "time", "run_id", "kind", "round", "fields", "prev", "hash")
_HEX = frozenset("0123456789abcdef")
_HEAD_DOMAIN = "fedapp-audit-head/1"
# Non-finite floats have no JSON spelling; proto3's JSON mapping writes them as these strings.
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


class AuditError(RuntimeError):
    """The log or its key cannot be trusted or used; the message is one line."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(entry_without_hash: dict) -> str:
    """SHA-256 (hex) of an entry's canonical JSON, every field but ``hash``.

    Seq and prev are inside, so an entry cannot move or be re-linked without
    its hash changing.
    """
    body = {k: v for k, v in entry_without_hash.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AuditEntry:
    """One line of the log: what happened (``kind``, ``fields``) and its place in the chain."""

    seq: int
    time: float
    run_id: str
    kind: str
    round: int | None
    fields: dict
    prev: str
    hash: str

    def to_json_line(self) -> str:
        """The canonical JSON text of the entry, without the newline."""
        return _canonical(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> AuditEntry:
        """An entry from a parsed line; ``ValueError`` saying what is wrong with it (hash not checked)."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in _FIELDS if k not in data]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        extra = sorted(set(data) - set(_FIELDS))
        if extra:
            raise ValueError(f"unexpected field {extra[0]!r}")
        if not _is_int(data["seq"]) or data["seq"] < 1:
            raise ValueError("seq must be a positive integer")
        if not (_is_int(data["time"]) or isinstance(data["time"], float)):
            raise ValueError("time must be a number")
        if not isinstance(data["run_id"], str) or not data["run_id"]:
            raise ValueError("run_id must be a non-empty string")
        if data["kind"] not in EVENT_KINDS:
            raise ValueError(f"unknown kind {data['kind']!r}")
        if data["round"] is not None and (not _is_int(data["round"]) or data["round"] < 0):
            raise ValueError("round must be null or a non-negative integer")
        if not isinstance(data["fields"], dict):
            raise ValueError("fields must be an object")
        if not _is_hex64(data["prev"]) or not _is_hex64(data["hash"]):
            raise ValueError("prev and hash must be 64 lowercase hex digits")
        return cls(**{k: data[k] for k in _FIELDS})


@dataclass(frozen=True)
class SignedHead:
    """The chain head at one moment, signed by the operator's audit key (hex strings)."""

    run_id: str
    seq: int
    head: str
    signature: str
    public_key: str
    signed_at: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SignedHead:
        """A head from a parsed head file; ``ValueError`` when a field is missing or malformed."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            head = cls(**{f: data[f] for f in ("run_id", "seq", "head", "signature", "public_key", "signed_at")})
        except KeyError as err:
            raise ValueError(f"missing field {err.args[0]!r}") from None
        if not isinstance(head.run_id, str) or not _is_int(head.seq) or head.seq < 0 or not _is_hex64(head.head):
            raise ValueError("run_id, seq or head malformed")
        if not (_is_int(head.signed_at) or isinstance(head.signed_at, float)):
            raise ValueError("signed_at must be a number")
        try:
            bytes.fromhex(head.signature)
            if len(bytes.fromhex(head.public_key)) != 32:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError("signature or public_key is not hex of the right length") from None
        return head


def head_message(run_id: str, seq: int, head: str) -> bytes:
    """The bytes a head signature covers: run id, seq and head, with a domain tag.

    Canonical JSON keeps the three apart unambiguously; the tag keeps an audit
    key's signature from being reused for anything else. Public so that a head
    recorded elsewhere (the store's row) can carry and check the same signature.
    """
    return _canonical({"domain": _HEAD_DOMAIN, "run_id": run_id, "seq": seq, "head": head}).encode("utf-8")


def head_path(path: str | Path) -> Path:
    """Where :meth:`AuditLog.sign_head` writes the signed head of the log at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".head.json")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Short SHA-256 fingerprint of an audit public key (recorded in ``run_start``; a resume must match it)."""
    return _fingerprint(_raw_public(public_key))


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON data: numpy scalars/arrays unwrapped, tuples as lists, ±inf/nan as strings."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else _NON_FINITE[value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit field {where}: keys must be strings, got {key!r}")
            out[str(key)] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return _plain(value.tolist(), where)
    raise ValueError(f"audit field {where} is not JSON-serialisable: {type(value).__name__}")


def _fsync_dir(folder: Path) -> None:
    """Make a created or replaced file's name durable, not only its bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- reading and checking


@dataclass
class _Scan:
    hashes: list[str]
    run_id: str | None
    lines: int
    first_bad: int | None = None
    problem: str = ""


def _no_constant(name: str) -> Any:
    """Bare NaN / Infinity never appear in a log we write (they are written as strings): a forgery."""
    raise ValueError(f"bare {name} is not valid in an audit entry")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # A second "fields" key would make tools that keep the first disagree with the hash.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _scan(data: bytes, run_id: str | None) -> _Scan:
    """Check the chain line by line; stop at the first entry that is wrong and say which.

    The diagnosis aims at the entry the attacker touched, not the one where the
    break shows: a line that links past its predecessor means that predecessor
    was inserted; a line whose own hash holds but whose link does not means the
    entry before it was rewritten (edited and re-hashed).
    """
    raw_lines = data.split(b"\n")
    torn = raw_lines.pop()  # b"" when the file ends with a newline
    scan = _Scan(hashes=[], run_id=run_id, lines=len(raw_lines) + (1 if torn else 0))

    def bad(number: int, problem: str) -> _Scan:
        scan.first_bad, scan.problem = number, problem
        return scan

    hashes = scan.hashes
    for i, raw in enumerate(raw_lines, start=1):
        try:
            obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
            entry = AuditEntry.from_dict(obj)
        except (ValueError, UnicodeDecodeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            return bad(i, f"line {i} is not a valid entry ({reason})")
        before = hashes[-2] if len(hashes) >= 2 else GENESIS  # hash of line i-2
        links_past = i >= 2 and entry.prev == before
        if entry.seq != i:
            if i >= 2 and entry.hash == hashes[-1]:
                return bad(i, f"line {i} repeats entry {i - 1}")
            if entry.seq == i - 1 and links_past:
                return bad(i - 1, f"entry {i - 1} was inserted: the entry after it links past it to entry {i - 2}")
            if entry.seq > i:
                return bad(i, f"line {i} holds entry {entry.seq}: entries are missing or moved here")
            return bad(i, f"line {i} holds entry {entry.seq} again: a duplicate or moved entry")
        own_ok = entry_hash(obj) == entry.hash
        if entry.prev != (hashes[-1] if hashes else GENESIS):
            if i == 1:
                return bad(1, "entry 1 does not start from the genesis hash")
            if links_past:
                return bad(i - 1, f"entry {i - 1} was inserted: entry {i} links past it to entry {i - 2}")
            if not own_ok:
                return bad(i, f"entry {i} was altered: neither its link nor its hash holds")
            return bad(i - 1, f"entry {i - 1} was rewritten after entry {i} was written (re-hashed)")
        if not own_ok:
            return bad(i, f"entry {i} was edited: its hash does not match its content")
        if scan.run_id is None:
            scan.run_id = entry.run_id
        elif entry.run_id != scan.run_id:
            return bad(i, f"entry {i} belongs to run {entry.run_id!r}, not {scan.run_id!r}")
        hashes.append(entry.hash)
    if torn:
        return bad(len(raw_lines) + 1, f"line {len(raw_lines) + 1} is incomplete (no trailing newline): a torn write")
    return scan


def _check_heads(hashes: list[str], heads: list[tuple[int, str, str]]) -> tuple[int, int | None, str]:
    """``(covered, first_bad, problem)`` for a consistent chain against recorded heads.

    Heads are checked in order of their seq; ``covered`` is the last one that
    matched, so entries ``1..covered`` are vouched for. A head that does not
    match means the chain was rewritten somewhere after ``covered`` (the exact
    entry cannot be known once every later hash was recomputed), so first_bad
    is ``covered + 1``: everything before it is proven intact.
    """
    covered = 0
    for seq, head, source in sorted(heads):
        if seq > len(hashes):
            return covered, len(hashes) + 1, (
                f"truncated: the log ends at entry {len(hashes)} but the recorded head ({source}) is entry {seq}"
            )
        actual = hashes[seq - 1] if seq else GENESIS
        if actual != head:
            return covered, covered + 1, (
                f"entries {covered + 1}..{seq} were rewritten: the chain does not reach the recorded head "
                f"({source}) at entry {seq}"
            )
        covered = seq
    return covered, None, ""


def _expected_heads(expected_head: Any) -> list[tuple[int, str, str]]:
    if expected_head is None:
        return []
    single = isinstance(expected_head, tuple) and len(expected_head) == 2 and _is_int(expected_head[0])
    pairs = [expected_head] if single else list(expected_head)
    heads = []
    for pair in pairs:
        seq, head = pair
        if seq == 0 and head in ("", GENESIS):  # nothing recorded yet (a crash right after the run was created)
            continue
        if not _is_int(seq) or seq < 0 or not _is_hex64(head):
            raise ValueError(f"expected_head must be (seq >= 0, 64 hex digits), got {pair!r}")
        heads.append((seq, head, "recorded"))
    return heads


# --------------------------------------------------------------------------- writing


class AuditLog:
    """Append-only writer of one run's audit log (JSON lines), continuing an existing chain.

    Opening an existing file reads and verifies it once (AuditError naming the
    first bad entry), then continues from its head: a resumed run keeps one
    chain. Appends never re-read the file; each batch is one ``write`` of whole
    lines and one ``fsync``, so a crash leaves at most one torn last line, which
    the next open refuses rather than guesses about.

    Parameters
    ----------
    path : str | Path
        The log file, created (with its folder) when missing.
    run_id : str
        The run every entry belongs to; an existing log of another run is refused.
    signing_key : Ed25519PrivateKey | None
        The operator's audit key, for :meth:`sign_head` (default: None, no signing).
    expected_head : tuple[int, str] | None
        A head recorded elsewhere (checkpoint, store row) that the existing log
        must reach, checked on opening (default: None).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        run_id: str,
        signing_key: Ed25519PrivateKey | None = None,
        expected_head: tuple[int, str] | None = None,
    ) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        self.path = Path(path)
        self.run_id = run_id
        self._key = signing_key
        if self.path.exists():
            data = self.path.read_bytes()
            scan = _scan(data, run_id)
            if scan.problem:
                raise AuditError(f"{self.path}: {scan.problem}")
            heads = _expected_heads(expected_head) + self._head_file_head()
            _, _, problem = _check_heads(scan.hashes, heads)
            if problem:
                raise AuditError(f"{self.path}: {problem}")
            self._seq, self._head, self._size = len(scan.hashes), (scan.hashes or [GENESIS])[-1], len(data)
            if self._seq:
                log(INFO, "Audit log %s continues at entry %d", self.path, self._seq + 1)
        else:
            recorded = max((seq for seq, _, _ in _expected_heads(expected_head)), default=0)
            if recorded:
                raise AuditError(f"{self.path} is missing, but a head was recorded for it (entry {recorded})")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            _fsync_dir(self.path.parent)
            self._seq, self._head, self._size = 0, GENESIS, 0

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, run_id={self.run_id!r}, seq={self._seq}, signed={self._key is not None})"

    @property
    def head(self) -> str:
        """Hash of the last entry (GENESIS when empty): record it to pin the log's content."""
        return self._head

    @property
    def seq(self) -> int:
        """Number of entries; entries are numbered 1..seq."""
        return self._seq

    def append(self, kind: str, round: int | None = None, **fields: Any) -> AuditEntry:
        """Write one entry (flushed and fsynced before returning)."""
        return self.extend([(kind, round, fields)])[0]

    def extend(self, items: Iterable[tuple[str, int | None, dict]]) -> list[AuditEntry]:
        """Write many entries with one write and one fsync (a round boundary writes ~20).

        All items are checked before anything is written: a bad one writes none.
        """
        entries, lines = [], []
        seq, prev, now = self._seq, self._head, time.time()
        for kind, round_, fields in items:
            if kind not in EVENT_KINDS:
                raise ValueError(f"kind must be one of {sorted(EVENT_KINDS)}, got {kind!r}")
            if round_ is not None:
                if isinstance(round_, bool) or not hasattr(round_, "__index__") or round_.__index__() < 0:
                    raise ValueError(f"round must be None or an integer >= 0, got {round_!r}")
                round_ = round_.__index__()
            seq += 1
            body = {"seq": seq, "time": now, "run_id": self.run_id, "kind": kind, "round": round_,
                    "fields": _plain(dict(fields), kind), "prev": prev}  # fmt: skip
            body["hash"] = prev = hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()
            entries.append(AuditEntry(**body))
            lines.append(_canonical(body) + "\n")  # what to_json_line gives, without asdict's deep copy
        if entries:
            self._write("".join(lines).encode("utf-8"))
            self._seq, self._head = seq, prev
        return entries

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size != self._size:
                raise AuditError(f"{self.path} changed since it was opened ({size} bytes, expected {self._size})")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # leave no torn line behind a failed write (disk full)
                raise
        finally:
            os.close(fd)
        self._size += len(data)

    def _head_file_head(self) -> list[tuple[int, str, str]]:
        """The head in the head file, which the log must still reach when it is reopened."""
        file = head_path(self.path)
        if not file.exists():
            return []
        try:
            signed = SignedHead.from_dict(json.loads(file.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as err:
            raise AuditError(f"{file} is not a valid signed head ({err})") from None
        if signed.run_id != self.run_id:
            raise AuditError(f"{file} is the head of run {signed.run_id!r}, not {self.run_id!r}")
        if self._key is not None:  # never go on signing a chain whose last head this key did not sign
            try:
                self._key.public_key().verify(
                    bytes.fromhex(signed.signature), head_message(signed.run_id, signed.seq, signed.head))
            except (InvalidSignature, ValueError):
                raise AuditError(
                    f"{file} is not signed by this run's audit key: the log may have been rewritten; refusing to "
                    "continue (and sign) it"
                ) from None
        return [(signed.seq, signed.head, "signed head")]

    def sign_head(self) -> SignedHead | None:
        """Sign the current head and write ``<path>.head.json`` atomically; None without a key."""
        if self._key is None:
            return None
        signature = self._key.sign(head_message(self.run_id, self._seq, self._head))
        signed = SignedHead(
            run_id=self.run_id,
            seq=self._seq,
            head=self._head,
            signature=signature.hex(),
            public_key=_raw_public(self._key.public_key()).hex(),
            signed_at=time.time(),
        )
        target = head_path(self.path)
        # A fresh, exclusively created name: a planted symlink cannot redirect the write.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            os.write(fd, (json.dumps(signed.to_dict(), indent=1) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return signed


# --------------------------------------------------------------------------- verifying


@dataclass
class VerifyReport:
    """What :func:`verify_log` found.

    ``entries`` counts the file's lines; ``head`` is the hash of the last entry
    that passed the chain checks; ``first_bad`` the 1-based number of the first
    entry that cannot be trusted (everything before it is intact); ``signed``
    is True only when the head file's signature was checked against a pinned
    public key and holds. ``covered`` entries are vouched for by a recorded or
    signed head; ``note`` says what an ``ok`` report does not vouch for.
    """

    ok: bool
    entries: int
    head: str
    first_bad: int | None
    problem: str
    signed: bool
    covered: int = 0
    note: str = ""

    def line(self) -> str:
        """One line for a person: verdict, size, short head, signature and any caveat."""
        if not self.ok:
            where = f" at entry {self.first_bad}" if self.first_bad is not None else ""
            return f"audit log TAMPERED{where}: {self.problem}"
        signature = "signed head verified with the pinned key" if self.signed else "head signature not verified"
        text = f"audit log OK: {self.entries} entries, head {self.head[:12]}, {signature}"
        return f"{text}; {self.note}" if self.note else text


def _read_head_file(
    file: Path, public_key: Ed25519PublicKey | None, run_id: str | None
) -> tuple[SignedHead | None, bool, str, str]:
    """``(head, signed, problem, note)`` for one head file."""
    try:
        signed = SignedHead.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None, False, f"no signed head at {file} (deleted?)", ""
    except (ValueError, UnicodeDecodeError) as err:
        return None, False, f"{file} is not a valid signed head ({err})", ""
    if run_id is not None and signed.run_id != run_id:
        return None, False, f"the signed head is for run {signed.run_id!r}, not {run_id!r}", ""
    embedded = bytes.fromhex(signed.public_key)
    if public_key is not None and embedded != _raw_public(public_key):
        return None, False, (
            f"the head is signed by key {_fingerprint(embedded)}, not the pinned key "
            f"{_fingerprint(_raw_public(public_key))}"
        ), ""
    key = public_key or Ed25519PublicKey.from_public_bytes(embedded)
    try:
        key.verify(bytes.fromhex(signed.signature), head_message(signed.run_id, signed.seq, signed.head))
    except InvalidSignature:
        return None, False, "the head signature is invalid", ""
    if public_key is None:
        return signed, False, "", "self-signed head: key not pinned, pass the operator's public key"
    return signed, True, "", ""


def verify_log(
    path: str | Path,
    *,
    expected_head: tuple[int, str] | Iterable[tuple[int, str]] | None = None,
    public_key: Ed25519PublicKey | None = None,
    head_file: str | Path | None = None,
    run_id: str | None = None,
) -> VerifyReport:
    """Check a log's chain, its recorded heads and its signed head; name the first bad entry.

    Parameters
    ----------
    path : str | Path
        The log file.
    expected_head : tuple[int, str] | Iterable[tuple[int, str]] | None
        ``(seq, head)`` recorded elsewhere (store row, checkpoints), or several of
        them; more than one narrows down where a re-hashed rewrite starts.
    public_key : Ed25519PublicKey | None
        The operator's pinned audit key. Given, the head file must exist and be
        signed by it (default: None, the head file's own key is used, which an
        attacker can replace: ``signed`` stays False).
    head_file : str | Path | None
        The signed head (default: ``<path>.head.json`` when it exists, or when
        ``public_key`` is given). Given explicitly, it must exist.
    run_id : str | None
        The run the log must belong to (default: None, the first entry's).

    Entries after the last recorded head are accepted (``ok=True``): the store
    records the head at round boundaries, so a process that died in between
    leaves such a tail. The report says how many entries are ``covered`` and
    the ``note`` names the unrecorded tail.
    """
    path = Path(path)
    heads = _expected_heads(expected_head)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return VerifyReport(False, 0, GENESIS, None, f"no audit log at {path}", False)
    scan = _scan(data, run_id)
    head = scan.hashes[-1] if scan.hashes else GENESIS

    def report(first_bad: int | None, problem: str, signed: bool = False, covered: int = 0) -> VerifyReport:
        return VerifyReport(False, scan.lines, head, first_bad, problem, signed, covered)

    file = Path(head_file) if head_file is not None else head_path(path)
    signed_head, signed, sig_problem, note = None, False, "", ""
    if head_file is not None or public_key is not None or file.exists():
        signed_head, signed, sig_problem, note = _read_head_file(file, public_key, run_id or scan.run_id)
    if scan.problem:
        return report(scan.first_bad, scan.problem, signed)
    if sig_problem:
        return report(None, sig_problem)
    if signed_head is not None:
        heads.append((signed_head.seq, signed_head.head, "signed head"))
    covered, first_bad, problem = _check_heads(scan.hashes, heads)
    if problem:
        return report(first_bad, problem, signed, covered)
    n = len(scan.hashes)
    if not heads and n:
        tail = "no recorded head given: a cut or rewritten log would look the same"
    elif covered < n:
        tail = f"unrecorded tail: entries {covered + 1}..{n} come after the last recorded head"
    else:
        tail = ""
    return VerifyReport(True, n, head, None, "", signed, covered, "; ".join(t for t in (tail, note) if t))


# --------------------------------------------------------------------------- keys


def generate_audit_key(out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new audit key pair: ``audit_ed25519.pem`` (PKCS8, 0600) and ``audit_ed25519.pub`` (PEM).

    Refuses to replace an existing key unless ``overwrite``: heads signed with
    the old key could no longer be checked against a newly pinned one.
    """
    folder = Path(out_dir)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if not overwrite and (private.exists() or public.exists()):
        raise AuditError(f"an audit key already exists in {folder} (pass overwrite=True to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, even briefly
    try:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The operator's audit key from a PKCS8 PEM file; AuditError on a missing or wrong file."""
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise AuditError(f"no audit signing key at {path} (make one with `fedapp keys audit`)") from None
    except (ValueError, TypeError) as err:
        raise AuditError(f"{path} is not an unencrypted PEM private key ({str(err).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path} holds a {type(key).__name__}, not an Ed25519 audit key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The pinned audit public key from a PEM file (or 64 hex digits, as in a head file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no audit public key at {path}") from None
    try:
        text = data.decode("ascii").strip()
        if len(text) == 64 and set(text.lower()) <= _HEX:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise AuditError(f"{path} is not a PEM public key ({str(err).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path} holds a {type(key).__name__}, not an Ed25519 audit key")
    return key
