"""Tamper matrix: an operator-side adversary edits a signed audit log; does verification catch him?

Builds one signed log of a realistic run (joins, refusals, aggregations with a
model digest, privacy spends, checkpoints), then tampers with copies of it,
one change per trial at a random place, and verifies each copy against the
heads recorded at round boundaries (as the run store and the checkpoints keep
them) and the operator's pinned public key. For each kind it counts detections
and whether the report names the right entry:

* ``edit``: one field value changed (epsilon 2.9 -> 1.9), the old hash kept: entry k;
* ``edit_rehash``: the same, with that entry's hash and every later one
  recomputed; only the recorded and signed heads catch it, and no verifier can
  know which re-hashed entry was the edited one, so the right answer is the
  first entry after the last recorded head that still matches;
* ``delete``: one line removed (the last one included): entry k;
* ``insert``: a forged, self-consistent line (right seq, linked to its
  predecessor, valid hash) put before an existing one: entry k;
* ``reorder``: two lines swapped: the first of them;
* ``truncate``: the last k lines cut: the first missing entry.

    python simulations/tamper.py    # prints the matrix as JSON
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedapp.store.audit import GENESIS, AuditLog, entry_hash, head_path, verify_log

KINDS = ("edit", "edit_rehash", "delete", "insert", "reorder", "truncate")


def _digest(rng: random.Random) -> str:
    return hashlib.sha256(rng.randbytes(16)).hexdigest()


def _round_items(rng: random.Random, rnd: int, clients: int) -> list[tuple[str, int | None, dict]]:
    """What a server writes at one round boundary."""
    items: list[tuple[str, int | None, dict]] = []
    if rng.random() < 0.3:
        items.append(("client_refused", rnd, {"client": f"client-{rng.randrange(clients)}",
                                              "reason_code": "update_norm", "reason": "norm 41.2 > 10"}))  # fmt: skip
    if rng.random() < 0.2:
        items.append(("client_quarantined", rnd, {"client": f"client-{rng.randrange(clients)}", "rounds": 3}))
    items.append(("aggregation", rnd, {"model_digest": _digest(rng), "num_clients": clients,
                                       "loss": round(rng.uniform(0.1, 2.0), 4)}))  # fmt: skip
    for c in range(clients):
        items.append(("privacy_spend", rnd, {"client": f"client-{c}", "epsilon": round(0.4 * rnd + rng.random(), 3),
                                             "delta": 1e-5}))  # fmt: skip
    items.append(("checkpoint", rnd, {"path": f"checkpoints/round-{rnd}.pt", "model_digest": _digest(rng)}))
    return items


def _build(path: Path, key: Ed25519PrivateKey, entries: int, rng: random.Random) -> list[tuple[int, str]]:
    """A signed log of exactly ``entries`` entries; returns the heads recorded at round boundaries."""
    clients = 4
    log = AuditLog(path, run_id="run-tamper", signing_key=key)
    items = [("run_start", None, {"config_digest": _digest(rng), "num_rounds": entries, "clients": clients})]
    items += [("client_joined", None, {"client": f"client-{c}", "node_id": rng.getrandbits(62)})
              for c in range(clients)]  # fmt: skip
    heads: list[tuple[int, str]] = []
    rnd = 0
    while True:
        room = entries - 1 - log.seq  # keep one place for run_end
        if len(items) >= room:
            log.extend(items[:room])
            break
        log.extend(items)
        heads.append((log.seq, log.head))
        rnd += 1
        items = _round_items(rng, rnd, clients)
    log.append("run_end", rnd, rounds=rnd, reason="completed")
    heads.append((log.seq, log.head))
    log.sign_head()
    return heads


def _mutate(entry: dict, rng: random.Random) -> None:
    """Change one recorded value the way a cover-up would."""
    fields = entry["fields"]
    if "epsilon" in fields:
        fields["epsilon"] = round(fields["epsilon"] - 1.0, 3)
        return
    name = rng.choice(sorted(fields))
    value = fields[name]
    if isinstance(value, bool):
        fields[name] = not value
    elif isinstance(value, (int, float)):
        fields[name] = value + 1
    elif isinstance(value, str) and value:
        fields[name] = value[:-1] + ("0" if value[-1] != "0" else "1")
    else:
        fields[name] = "redacted"


def _rehash(lines: list[str], start: int) -> None:
    """Recompute hash and link of lines ``start``.. (0-based), as an attacker covering his edit would."""
    prev = json.loads(lines[start - 1])["hash"] if start else GENESIS
    for j in range(start, len(lines)):
        entry = json.loads(lines[j])
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)
        lines[j] = json.dumps(entry, sort_keys=True) + "\n"


def _tamper(kind: str, lines: list[str], heads: list[tuple[int, str]], rng: random.Random) -> tuple[list[str], int]:
    """A tampered copy of ``lines`` and the entry number a good report names."""
    lines, n = list(lines), len(lines)
    if kind in ("edit", "edit_rehash"):
        k = rng.randint(1, n)
        entry = json.loads(lines[k - 1])
        _mutate(entry, rng)
        lines[k - 1] = json.dumps(entry, sort_keys=True) + "\n"
        if kind == "edit":
            return lines, k
        _rehash(lines, k - 1)
        return lines, max((s for s, _ in heads if s < k), default=0) + 1
    if kind == "delete":
        k = rng.randint(1, n)
        del lines[k - 1]
        return lines, k
    if kind == "insert":
        p = rng.randint(1, n)  # before an existing line; appending past the last head is not detectable
        before = json.loads(lines[p - 2]) if p > 1 else None
        forged = {"seq": p, "time": before["time"] if before else 0.0, "run_id": "run-tamper",
                  "kind": "client_released", "round": before["round"] if before else None,
                  "fields": {"client": f"client-{rng.randrange(4)}", "reason": "manual review"},
                  "prev": before["hash"] if before else GENESIS}  # fmt: skip
        forged["hash"] = entry_hash(forged)
        lines.insert(p - 1, json.dumps(forged, sort_keys=True) + "\n")
        return lines, p
    if kind == "reorder":
        p, q = sorted(rng.sample(range(1, n + 1), 2))
        lines[p - 1], lines[q - 1] = lines[q - 1], lines[p - 1]
        return lines, p
    if kind == "truncate":
        k = rng.randint(1, n)
        return lines[: n - k], n - k + 1
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def tamper_matrix(workdir: Path, *, entries: int = 50, trials_per_kind: int = 20, seed: int = 0) -> dict[str, Any]:
    """Detection and first-bad-entry accuracy for each kind of tampering (see the module doc).

    Returns ``{"entries", "trials_per_kind", "seed", "recorded_heads", "kinds": {kind: {"trials",
    "detected", "first_bad_correct", "detection_rate"}}, "all_detected"}``.
    """
    if entries < 10:
        raise ValueError(f"entries must be >= 10 (a run start, joins and a round), got {entries}")
    if trials_per_kind < 1:
        raise ValueError(f"trials_per_kind must be >= 1, got {trials_per_kind}")
    rng = random.Random(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    base = workdir / "audit.jsonl"
    for stale in (base, head_path(base)):
        stale.unlink(missing_ok=True)
    heads = _build(base, key, entries, rng)
    lines = base.read_text(encoding="utf-8").splitlines(keepends=True)
    trial = workdir / "tampered.jsonl"
    kinds: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        detected = correct = 0
        for _ in range(trials_per_kind):
            tampered, expected = _tamper(kind, lines, heads, rng)
            trial.write_text("".join(tampered), encoding="utf-8")
            report = verify_log(trial, expected_head=heads, public_key=key.public_key(), head_file=head_path(base))
            detected += not report.ok
            correct += not report.ok and report.first_bad == expected
        kinds[kind] = {"trials": trials_per_kind, "detected": detected, "first_bad_correct": correct,
                       "detection_rate": detected / trials_per_kind}  # fmt: skip
    return {"entries": entries, "trials_per_kind": trials_per_kind, "seed": seed, "recorded_heads": len(heads),
            "kinds": kinds, "all_detected": all(k["detected"] == k["trials"] for k in kinds.values())}  # fmt: skip


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(tamper_matrix(Path(folder)), indent=2))
