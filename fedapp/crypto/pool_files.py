"""A client's obfuscator pool on disk: precomputed offline, refilled in the background, each value used once.

Paillier encryption is dominated by the obfuscator ``r^n mod n^2`` (one per
ciphertext); it does not depend on the update, so a client can compute it
whenever it has an idle core: ahead of the whole run (``python -m fedapp.keys
pool``, the offline phase, e.g. while a phone charges) or in a background
thread after each reply. The round then only packs and multiplies.

One file per client (``partition-<id>.pool``, mode 0600: an obfuscator
decrypts the ciphertext it was used for, so the file is as secret as the key).
:func:`take_obfuscators` moves the file away before reading it and writes
back only what it did not hand out, so no value can be used twice even if a
background refill writes a new file at the same moment.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from fedapp.crypto.keys import ObfuscatorPool, PrivateKey, PublicKey

KeyLike = PrivateKey | PublicKey  # threshold-key clients hold only the public key: slower, same values


def _public(key: KeyLike) -> PublicKey:
    return key.public_key if isinstance(key, PrivateKey) else key

log = logging.getLogger("flwr")  # Flower's logger, like the rest of fedapp


def pool_path(pool_dir: str | Path, partition_id: int) -> Path:
    """Where the pool of client ``partition_id`` lives in ``pool_dir``."""
    return Path(pool_dir) / f"partition-{partition_id}.pool"


def _save_atomically(pool: ObfuscatorPool, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}-{threading.get_ident()}")
    pool.save(partial)  # mode 0600
    os.replace(partial, path)


def take_obfuscators(path: Path, key: KeyLike, count: int) -> ObfuscatorPool | None:
    """``count`` obfuscators from the pool at ``path``, removed from disk before they are used.

    The rest goes back to ``path``. ``None`` when there is no pool, or fewer
    than ``count`` values (those stay for nothing: a short pool is discarded
    rather than mixed with online values): the caller computes online.
    """
    claimed = path.with_suffix(f".taking-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(path, claimed)  # atomic: nobody else can hand out these values now
    except FileNotFoundError:
        return None
    try:
        pool = ObfuscatorPool.load(claimed, _public(key))
    except (ValueError, KeyError) as err:  # another key, or a torn file: never fatal, just slower
        log.warning("Ignoring obfuscator pool %s: %s", path, err)
        return None
    finally:
        claimed.unlink(missing_ok=True)
    if len(pool) < count:
        log.warning("Obfuscator pool %s holds %d < %d needed: discarded, computing online", path, len(pool), count)
        return None
    taken = ObfuscatorPool(_public(key), pool.take(count))
    if len(pool):
        _save_atomically(pool, path)
    return taken


def remaining(path: Path) -> int:
    """How many obfuscators the pool at ``path`` holds now (0 if none)."""
    try:
        return len(json.loads(path.read_text())["values"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def precompute_pool(path: Path, key: KeyLike, count: int, *, workers: int = 1) -> ObfuscatorPool:
    """The offline phase: ``count`` fresh obfuscators written to ``path`` (replacing what was there).

    With a private key the CRT path is used; with the public key alone (a
    threshold-key client) phe's ``r^n mod n^2``, about 3x slower, same distribution.
    """
    pool = ObfuscatorPool(_public(key))
    pool.fill(count, private_key=key if isinstance(key, PrivateKey) else None, workers=workers)
    _save_atomically(pool, path)
    return pool


def refill_in_background(path: Path, key: KeyLike, count: int) -> threading.Thread:
    """Compute ``count`` obfuscators in a thread and save them to ``path`` (when the pool there ran dry).

    Off the round's critical path only when the client has a spare core between
    rounds; in a simulation on few cores the thread competes with the other
    clients' training (see docs/secure_aggregation.md). Non-daemon, so a
    ClientApp process that ends after its reply still finishes the file.
    """
    thread = threading.Thread(
        target=precompute_pool, args=(path, key, count), name=f"obfuscator-pool-{path.stem}", daemon=False
    )
    thread.start()
    return thread
