"""Checkpoints: the global model and the server's state at a round boundary, in one file.

Why one ``.npz`` file and no pickle: a checkpoint is read back by the server
that resumes the run, and a pickle would let whoever can write the output
folder run code in that server. ``numpy.load(..., allow_pickle=False)`` reads
arrays only; everything that is not an array (round number, config hash,
accountant histories, exclusion list, RNG states) travels as one JSON document
stored as a byte array beside them.

A checkpoint is written atomically (temporary file in the same folder, fsync,
rename, fsync of the folder), so a crash leaves either the previous checkpoint
or the new one, never half of one; its SHA-256 is recorded in the run store and
checked before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fedapp-checkpoint/1"
_META = "__meta__"
_ARRAY_REF = "__ndarray__"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be used (missing, altered, or from another run); one line."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds, as read back."""

    round: int
    model: list[np.ndarray]
    state: dict[str, Any]
    meta: dict[str, Any]


@dataclass(frozen=True)
class WrittenCheckpoint:
    """Where a checkpoint went, its digest and what writing it cost."""

    path: Path
    sha256: str
    size_bytes: int
    write_s: float


def checkpoint_name(server_round: int) -> str:
    """File name of the checkpoint taken after ``server_round`` (sorts by round)."""
    return f"round-{server_round:06d}.ckpt.npz"


def write_checkpoint(
    path: str | Path, *, server_round: int, model: list[np.ndarray], state: dict[str, Any], meta: dict[str, Any]
) -> WrittenCheckpoint:
    """Write model + state atomically to ``path``; return its SHA-256 and size.

    ``state`` may nest dicts and lists of JSON scalars and numpy arrays; the
    arrays are stored as arrays (exactly, any dtype) and referenced from the JSON.
    """
    started = time.perf_counter()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"model/{i}": np.asarray(a) for i, a in enumerate(model)}
    document = {
        "format": FORMAT,
        "round": int(server_round),
        "model_arrays": len(model),
        "meta": meta,
        "state": _extract_arrays(state, arrays, "state"),
    }
    arrays[_META] = np.frombuffer(json.dumps(document, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    # mkstemp: a fresh name created exclusively with mode 0600 (a planted symlink cannot redirect the
    # write, and the model and state are readable by the server's user only).
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return WrittenCheckpoint(target, hashlib.sha256(payload).hexdigest(), len(payload), time.perf_counter() - started)


def read_checkpoint(path: str | Path, *, expected_sha256: str) -> Checkpoint:
    """Load a checkpoint after checking its SHA-256 against the recorded one."""
    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"checkpoint {target} is missing")
    payload = target.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != expected_sha256:
        raise CheckpointError(
            f"checkpoint {target} does not match its recorded SHA-256 (recorded {expected_sha256[:16]}..., "
            f"file {digest[:16]}...): it was altered or damaged; refusing to resume from it"
        )
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        document = json.loads(arrays.pop(_META).tobytes().decode())
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {target} cannot be read: {err}") from err
    if document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {target} has format {document.get('format')!r}, expected {FORMAT!r}")
    model = [arrays[f"model/{i}"] for i in range(int(document["model_arrays"]))]
    state = _restore_arrays(document["state"], arrays)
    return Checkpoint(round=int(document["round"]), model=model, state=state, meta=document["meta"])


def prune_checkpoints(folder: str | Path, keep: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints in ``folder`` (never ``protect``); the deleted paths."""
    for stale in Path(folder).glob(".round-*.ckpt.npz.*.tmp"):  # left by a crash mid-write
        stale.unlink(missing_ok=True)
    found = sorted(Path(folder).glob("round-*.ckpt.npz"))
    doomed = [p for p in found[: max(0, len(found) - keep)] if p != protect]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def model_digest(model: list[np.ndarray]) -> str:
    """SHA-256 over the arrays' dtypes, shapes and bytes: names a global model in the audit log."""
    h = hashlib.sha256()
    for a in model:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _extract_arrays(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {_ARRAY_REF: path}
    if isinstance(value, dict):
        return {str(k): _extract_arrays(v, arrays, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract_arrays(v, arrays, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _restore_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            return arrays[value[_ARRAY_REF]]
        return {k: _restore_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_arrays(v, arrays) for v in value]
    return value


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
