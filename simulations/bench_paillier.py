"""Paillier micro-benchmark: what one client's update costs to encrypt, add and decrypt.

    python simulations/bench_paillier.py [--bits 2048 --clients 10 --naive-sample 20]

For the sizes of ``cnn_mnist_small`` and ``cnn_mnist`` (parameters counted from
fedapp.models) at a ``--bits`` key, one process, one core unless stated:

* naive phe: ``public_key.encrypt(float)``, one value per ciphertext, timed on
  ``--naive-sample`` values and extrapolated (the full run takes minutes);
* packed + phe: fedapp.crypto packing, phe's ``raw_encrypt`` per plaintext;
* packed + CRT: the obfuscator from the factorisation (1 and 2 processes);
* packed + pool: obfuscators precomputed (the precompute is reported apart:
  it runs between rounds, off the critical path), online cost only;
* server: homomorphic sum of ``--clients`` updates; key holder: decrypt + unpack;
* bytes per client on the wire vs float32.

Writes ``simulations/results/paillier_micro.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from fedapp.crypto import (
    EncryptedVector,
    ObfuscatorPool,
    Quantizer,
    ReplayGuard,
    SlotLayout,
    add_encrypted,
    decrypt_aggregate,
    encrypt_plaintexts,
    encrypt_vector,
    generate_keypair,
    make_obfuscators,
    pack,
)

RESULTS = Path(__file__).resolve().parent / "results"


def model_sizes() -> dict[str, int]:
    from fedapp.models import MODELS, count_parameters  # torch: only for the counts

    return {name: count_parameters(MODELS[name].factory(10)) for name in ("cnn_mnist_small", "cnn_mnist")}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_model(name: str, size: int, keys, args: argparse.Namespace) -> dict:
    public, private = keys
    rng = np.random.default_rng(0)
    quantizer = Quantizer(bound=args.bound, bits=args.value_bits)
    layout = SlotLayout(bits=args.value_bits, max_clients=args.clients, max_weight=1, key_bits=args.bits)
    update = rng.normal(0, 0.05, size)
    row: dict = {"model": name, "values": size, "ciphertexts": layout.num_ciphertexts(size)}

    sample = [float(v) for v in update[: args.naive_sample]]
    _, t = timed(lambda: [public.phe.encrypt(v) for v in sample])
    row["naive_phe_encrypt_s"] = t / len(sample) * size
    row["naive_bytes"] = size * public.ciphertext_bytes

    plaintexts = pack(quantizer.encode(update), layout)
    _, t = timed(lambda: [public.phe.raw_encrypt(m) for m in plaintexts])
    row["packed_phe_encrypt_s"] = t

    common = dict(public_key=public, layout=layout, quantizer=quantizer, server_round=1, sender="c0")
    _, row["packed_crt_encrypt_s"] = timed(encrypt_vector, update, private_key=private, **common)
    _, row["packed_crt_2proc_encrypt_s"] = timed(encrypt_vector, update, private_key=private, workers=2, **common)

    pool = ObfuscatorPool(public)
    _, row["pool_precompute_s"] = timed(pool.fill, row["ciphertexts"], private_key=private)
    msg, row["packed_pool_encrypt_s"] = timed(encrypt_vector, update, pool=pool, **common)

    blob, row["serialise_s"] = timed(msg.to_bytes, public)
    _, row["parse_validate_s"] = timed(
        EncryptedVector.from_bytes, blob, public, expected_round=1, expected_num_values=size, replay_guard=ReplayGuard()
    )
    row["bytes_per_client"] = len(blob)
    row["float32_bytes"] = 4 * size
    row["bytes_ratio_vs_float32"] = len(blob) / (4 * size)

    # Server: sum of --clients updates. BENCHMARK ONLY: the clients share one list of
    # obfuscators here (reusing r is insecure); the sum costs the same either way.
    obfs = make_obfuscators(row["ciphertexts"], public_key=public, private_key=private)
    updates = [rng.normal(0, 0.05, size) for _ in range(args.clients)]
    messages = []
    for i, u in enumerate(updates):
        m = EncryptedVector(**{**msg.__dict__, "sender": f"c{i}", "contributors": [f"c{i}"]})
        m.ciphertexts = encrypt_plaintexts(pack(quantizer.encode(u), layout), public, obfs)
        messages.append(m)
    aggregate, row["server_sum_s"] = timed(add_encrypted, messages, public)
    (total, weight), row["decrypt_s"] = timed(decrypt_aggregate, aggregate, private, min_contributors=2)
    expected = sum(np.clip(u, -args.bound, args.bound) for u in updates)
    row["max_abs_error_of_sum"] = float(np.max(np.abs(total - expected)))
    row["error_bound_of_sum"] = quantizer.error_bound(weight)
    row["speedup_crt_vs_phe_packed"] = row["packed_phe_encrypt_s"] / row["packed_crt_encrypt_s"]
    row["speedup_packed_crt_vs_naive"] = row["naive_phe_encrypt_s"] / row["packed_crt_encrypt_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--value-bits", type=int, default=16)
    parser.add_argument("--bound", type=float, default=1.0)
    parser.add_argument("--naive-sample", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "paillier_micro.json"))
    args = parser.parse_args()

    keys, keygen_s = timed(generate_keypair, args.bits)
    layout = SlotLayout(bits=args.value_bits, max_clients=args.clients, key_bits=args.bits)
    rows = [bench_model(name, size, keys, args) for name, size in model_sizes().items()]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}",
        "load_average_1m_at_end": os.getloadavg()[0],
        "key_bits": args.bits,
        "keygen_s": keygen_s,
        "layout": {"value_bits": args.value_bits, "headroom_bits": layout.headroom, "slot_bits": layout.slot_bits,
                   "slots_per_ciphertext": layout.slots, "max_clients": args.clients},
        "quantisation_step": Quantizer(bound=args.bound, bits=args.value_bits).step,
        "models": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.bits}-bit key, {layout.slots} slots of {layout.slot_bits} bits per ciphertext, {args.clients} clients")
    keys_ = [
        ("naive phe encrypt (extrapolated)", "naive_phe_encrypt_s"),
        ("packed, phe raw_encrypt", "packed_phe_encrypt_s"),
        ("packed, CRT obfuscator", "packed_crt_encrypt_s"),
        ("packed, CRT, 2 processes", "packed_crt_2proc_encrypt_s"),
        ("pool precompute (off path)", "pool_precompute_s"),
        ("packed, pool (online)", "packed_pool_encrypt_s"),
        ("serialise", "serialise_s"),
        ("parse + validate", "parse_validate_s"),
        (f"server sum of {args.clients}", "server_sum_s"),
        ("decrypt + unpack aggregate", "decrypt_s"),
    ]
    print(f"{'seconds':36s}" + "".join(f"{r['model']:>18s}" for r in rows))
    print(f"{'values / ciphertexts':36s}" + "".join(f"{r['values']:>11d} / {r['ciphertexts']:<4d}" for r in rows))
    for label, key in keys_:
        print(f"{label:36s}" + "".join(f"{r[key]:18.3f}" for r in rows))
    print(f"{'bytes per client / float32':36s}" + "".join(f"{r['bytes_ratio_vs_float32']:18.3f}" for r in rows))
    print(f"{'naive bytes / float32':36s}" + "".join(f"{r['naive_bytes'] / r['float32_bytes']:18.1f}" for r in rows))
    print(f"{'max |error| of sum (bound)':36s}" + "".join(
        f"{r['max_abs_error_of_sum']:10.2e} ({r['error_bound_of_sum']:.1e})" for r in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
