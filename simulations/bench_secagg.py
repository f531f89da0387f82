"""Secure aggregation side by side: the same experiment in the clear, with Paillier and with SecAgg+.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_secagg.py --repeats 3   # the figures
    python simulations/bench_secagg.py --rounds 2 --max-train-samples 5000 --key-bits 512 \\
        --results-dir /tmp/secagg_smoke --out /tmp/secagg_smoke/runs                # smoke

Runs preset ``secagg_mnist`` (full MNIST, 10 clients IID, cnn_mnist_small,
FedAvg, same seed and rounds) once per ``--methods`` entry in the simulation
engine: ``none`` (plaintext), ``paillier`` (every obfuscator computed during
the round), ``paillier_offline`` (the clients' obfuscators precomputed before
the run by ``python -m fedapp.keys pool``, the offline phase, whose cost is
timed and reported per client per round) and ``secaggplus``. With
``--repeats`` > 1 the methods run interleaved (A B C D A B C D ...), so that
drift in the machine's load hits every method alike; each ratio is taken
within one repeat and the median over repeats is reported. The Paillier key
pair is made before the runs with ``python -m fedapp.keys generate`` into the
output folder, in its own process: the ServerApp only ever loads the public key.

Per round it keeps the wall time (``round_time_s``: fit, aggregation,
decryption or unmasking and central evaluation) and the bytes each client
uploads (``upload_update_bytes``: nbytes of the model-update payload of its fit
reply; ``upload_total_bytes``: every training reply of the round, keys, shares
and decrypted sums included; see :mod:`fedapp.traffic`). Reports mean round
time (round 1 left out when there are more: it includes starting Ray's
workers), bytes, final accuracy, and the ratios paillier/plaintext and
secaggplus/plaintext, with the accuracy difference in percentage points.
Writes ``secagg.json`` and ``secagg.png`` to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedapp.hydra_config import compose_experiment  # noqa: E402
from fedapp.simulation import run_in_simulation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {
    "none": "plaintext", "paillier": "single-key Paillier (online)",
    "paillier_offline": "single-key Paillier (offline obfuscators)",
    "threshold": "threshold Paillier t=2 (online)", "secaggplus": "SecAgg+",
}
# threshold Paillier with t given (and optionally secagg.bits), obfuscators offline
THRESHOLD_OFFLINE = re.compile(r"threshold_offline_t(\d+)(?:_b(\d+))?$")


def label(variant: str) -> str:
    match = THRESHOLD_OFFLINE.match(variant)
    if not match:
        return LABELS[variant]
    bits = f", {match.group(2)}-bit values" if match.group(2) else ""
    return f"threshold Paillier t={match.group(1)}{bits} (offline obfuscators)"


def threshold_of(variant: str) -> int | None:
    match = THRESHOLD_OFFLINE.match(variant)
    return int(match.group(1)) if match else (2 if variant == "threshold" else None)


def deal_keys(key_dir: Path, bits: int, clients: int, threshold: int) -> None:
    """Threshold keys, dealt in their own process (``python -m fedapp.keys deal``); every sum needs all clients."""
    subprocess.run(
        [sys.executable, "-m", "fedapp.keys", "deal", "--dir", str(key_dir), "--clients", str(clients),
         "--threshold", str(threshold), "--min-contributors", str(clients), "--bits", str(bits), "--force"],
        check=True,
    )


def make_keys(key_dir: Path, bits: int) -> None:
    """The clients' key pair, made in its own process (never by the ServerApp)."""
    if (key_dir / "paillier_private.json").exists():
        shown = subprocess.run(
            [sys.executable, "-m", "fedapp.keys", "show", "--dir", str(key_dir)], capture_output=True, text=True
        ).stdout
        if f"({bits} bits)" in shown:
            return
    subprocess.run(
        [sys.executable, "-m", "fedapp.keys", "generate", "--dir", str(key_dir), "--bits", str(bits), "--force"],
        check=True,
    )


def make_offline_pools(pool_dir: Path, key_dir: Path, rounds: int, overrides: list[str]) -> float:
    """The offline phase in its own process (as a client would run it); its seconds per client per round."""
    shutil.rmtree(pool_dir, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "fedapp.keys", "pool", "--dir", str(key_dir), "--pool-dir", str(pool_dir),
         "--rounds", str(rounds), "--workers", str(os.cpu_count() or 1), *overrides],
        check=True, capture_output=True, text=True,
    )
    print(done.stdout.strip())
    # the pool is made with every core of this machine; per client and round on one core it is cores x this
    return float(re.search(r"([0-9.]+) s per client per round", done.stdout).group(1)) * (os.cpu_count() or 1)


def run_one(variant: str, args: argparse.Namespace, key_dir: Path, repeat: int) -> dict[str, Any]:
    threshold = threshold_of(variant)
    method = "paillier" if variant.startswith("paillier") or threshold is not None else variant
    if threshold is not None:
        key_dir = (args.out / f"keys-t{threshold}").resolve()
        deal_keys(key_dir, args.key_bits, 10, threshold)
    overrides = [
        "+experiment=secagg_mnist",
        f"secagg={method}",
        f"num_rounds={args.rounds}",
        f"seed={args.seed}",
        f"dataset.max_train_samples={args.max_train_samples}",
        f"dataset.max_test_samples={args.max_test_samples}",
    ]
    if method == "paillier":
        overrides += [f"secagg.key_dir={key_dir}", f"secagg.key_bits={args.key_bits}"]
    if threshold is not None:
        overrides += ["secagg.min_contributors=10", f"secagg.decryptors={threshold}"]
        match = THRESHOLD_OFFLINE.match(variant)
        if match and match.group(2):
            overrides.append(f"secagg.bits={match.group(2)}")
    offline_s = None
    if variant == "paillier_offline" or "offline" in variant:
        pool_dir = (args.out / "pools").resolve()
        overrides.append(f"secagg.pool_dir={pool_dir}")
        # one round more than the run uses, so no background refill runs after the last round
        offline_s = make_offline_pools(pool_dir, key_dir, args.rounds + 1, overrides)
    cfg = compose_experiment(overrides)
    cfg.runtime.output_dir = str(args.out / f"{variant}-{repeat}")
    started = time.perf_counter()
    summary = run_in_simulation(cfg)
    wall = time.perf_counter() - started
    rows = [r for r in json.loads((Path(cfg.runtime.output_dir) / "metrics.json").read_text()) if r["round"] >= 1]
    steady = rows[1:] if len(rows) > 1 else rows

    def mean(key: str, of: list[dict[str, Any]]) -> float | None:
        values = [r[key] for r in of if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "variant": variant,
        "method": method,
        "label": label(variant),
        "threshold": threshold,
        "final_test_accuracy": summary["final_test_accuracy"],
        "mean_round_time_s": mean("round_time_s", steady),
        "mean_round_time_all_rounds_s": mean("round_time_s", rows),
        "upload_update_bytes_per_client": mean("upload_update_bytes", rows),
        "upload_total_bytes_per_client": mean("upload_total_bytes", rows),
        "total_wall_time_s": round(wall, 1),
        "offline_obfuscators_s_per_client_per_round": offline_s,
        "load_average_1m_after": os.getloadavg()[0],
        "per_round": [
            {k: r.get(k) for k in ("round", "round_time_s", "upload_update_bytes", "upload_total_bytes", "test_accuracy", "fit_clients")}
            for r in rows
        ],
        "config": cfg.to_dict(),
    }


def summarise(repeats: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method: the run of the first repeat, with round time and its spread over the repeats."""
    out = {}
    for name, first in repeats[0].items():
        times = [rep[name]["mean_round_time_s"] for rep in repeats]
        out[name] = {**first, "mean_round_time_s": statistics.median(times), "round_time_s_per_repeat": times,
                     "final_test_accuracy_per_repeat": [rep[name]["final_test_accuracy"] for rep in repeats]}
    return out


def ratios(runs: dict[str, dict[str, Any]], repeats: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each secure variant against plaintext: time (median of within-repeat ratios) and bytes, accuracy in pp."""
    base = runs.get("none")
    if base is None:
        return {}

    def ratio(run: dict[str, Any], key: str) -> float | None:
        return run[key] / base[key] if run[key] is not None and base[key] else None

    def time_ratios(name: str) -> list[float]:
        return [rep[name]["mean_round_time_s"] / rep["none"]["mean_round_time_s"] for rep in repeats]

    return {
        f"{name}/plaintext": {
            "round_time": statistics.median(time_ratios(name)),
            "round_time_per_repeat": time_ratios(name),
            "update_bytes": ratio(run, "upload_update_bytes_per_client"),
            "total_bytes": ratio(run, "upload_total_bytes_per_client"),
            "accuracy_diff_pp": 100 * (run["final_test_accuracy"] - base["final_test_accuracy"]),
        }
        for name, run in runs.items()
        if name != "none"
    }


def time_per_call(fn, values: list, repeats: int = 3) -> float:
    """Median seconds of one ``fn(v)`` over ``values`` (best of ``repeats`` passes)."""
    best = []
    for _ in range(repeats):
        started = time.perf_counter()
        for v in values:
            fn(v)
        best.append((time.perf_counter() - started) / len(values))
    return min(best)


def threshold_costs(key_bits: int, num_ciphertexts: int, thresholds: list[int], clients: int = 10) -> dict[str, Any]:
    """Per-party costs of threshold decryption at ``key_bits``, measured here, and the critical path they imply.

    A partial decryption cannot use the CRT shortcut (no party knows the
    factors), so it is timed beside a CRT decryption. The server's combination
    grows with t. With one machine per client the decryptors work in parallel,
    so the decryption adds one partial decryption plus the combination to the
    round, whatever t is; on this machine the t decryptors share its cores.
    """
    import gmpy2

    from fedapp.crypto import make_obfuscators
    from fedapp.crypto.keys import PrivateKey, PublicKey
    from fedapp.crypto.threshold import _deal_from_primes, combine_partials, generate_safe_prime
    from fedapp.crypto.vectors import encrypt_plaintexts

    p, q = generate_safe_prime(key_bits // 2), generate_safe_prime(key_bits // 2)
    sample = 16
    out: dict[str, Any] = {"key_bits": key_bits, "num_ciphertexts": num_ciphertexts, "by_threshold": {}}
    for t in thresholds:
        public_key, shares = _deal_from_primes(p, q, threshold=t, num_parties=clients)
        plaintexts = [secrets_below(int(public_key.n)) for _ in range(sample)]
        cts = encrypt_plaintexts(plaintexts, public_key, make_obfuscators(sample, public_key=public_key))
        if "partial_decrypt_s" not in out:
            private = PrivateKey(PublicKey(int(public_key.n)), p, q)
            out["partial_decrypt_s"] = time_per_call(lambda c: shares[0].partial_decrypt([c]), cts)
            out["crt_decrypt_s"] = time_per_call(lambda c: private.phe.raw_decrypt(c), cts)
            out["public_obfuscator_s"] = time_per_call(lambda _: make_obfuscators(1, public_key=public_key), cts)
            out["ciphertext_product_s"] = time_per_call(lambda c: gmpy2.mpz(c) * c % public_key.nsquare, cts)
        partials = {s.index: s.partial_decrypt(cts) for s in shares[:t]}
        started = time.perf_counter()
        assert combine_partials(partials, public_key, threshold=t, num_parties=clients) == plaintexts
        combine = (time.perf_counter() - started) / sample
        cores = os.cpu_count() or 1
        out["by_threshold"][str(t)] = {
            "combine_s_per_ciphertext": combine,
            "decryption_phase_one_machine_per_client_s": num_ciphertexts * (out["partial_decrypt_s"] + combine),
            "decryption_phase_this_machine_s": num_ciphertexts * (-(-t // cores) * out["partial_decrypt_s"] + combine),
        }
    out["partial_over_crt"] = out["partial_decrypt_s"] / out["crt_decrypt_s"]
    return out


def secrets_below(n: int) -> int:
    import secrets

    return secrets.randbelow(n)


def verdict(runs: dict[str, dict[str, Any]], ratio: dict[str, dict[str, Any]], costs: dict[str, Any] | None) -> dict:
    """One entry per figure of the issue, from what was measured."""
    out: dict[str, Any] = {}
    t2 = "threshold_offline_t2" if "threshold_offline_t2" in runs else ("threshold" if "threshold" in runs else None)
    if t2 is None or "none" not in runs:
        return out
    r = ratio[f"{t2}/plaintext"]
    out["round time at t=2 vs plaintext (this machine: 10 clients on 2 cores)"] = {
        "value": round(r["round_time"], 3), "target": 2.0, "met": r["round_time"] <= 2.0}
    if costs is not None:
        base = runs["none"]["mean_round_time_s"]
        n = costs["num_ciphertexts"]
        # one machine per client: clients train in parallel as in plaintext; each adds its own encryption from the
        # offline pool (one multiplication per ciphertext: negligible) and signing; the server multiplies the m
        # ciphertexts; one partial decryption runs on each of t machines at once; the server combines t partials
        extra = n * 10 * costs["ciphertext_product_s"] + costs["by_threshold"]["2"]["decryption_phase_one_machine_per_client_s"]
        value = (base + extra) / base
        out["round time at t=2 vs plaintext (per-party critical path, one machine per client)"] = {
            "value": round(value, 3), "target": 2.0, "met": value <= 2.0}
    float32 = runs["none"]["upload_update_bytes_per_client"]
    total = runs[t2]["upload_total_bytes_per_client"]
    out["upload per client counting every reply vs float32 (t=2)"] = {
        "value": round(total / float32, 3), "target": 1.5, "met": total / float32 <= 1.5}
    narrow = "threshold_offline_t2_b15"
    if narrow in runs:  # the same protocol with 15-bit fixed point: one slot bit less per value
        total = runs[narrow]["upload_total_bytes_per_client"]
        out["upload per client counting every reply vs float32 (t=2, secagg.bits=15)"] = {
            "value": round(total / float32, 3), "target": 1.5, "met": total / float32 <= 1.5,
            "accuracy_diff_pp_vs_plaintext": round(ratio[f"{narrow}/plaintext"]["accuracy_diff_pp"], 3)}
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    names = list(runs)
    labels = [runs[n]["label"] for n in names]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
    times = [runs[n]["mean_round_time_s"] or 0.0 for n in names]
    ax_t.bar(labels, times, color="tab:blue")
    ax_t.set(ylabel="mean wall time per round (s)", title="round time")
    for x, t in enumerate(times):
        ax_t.annotate(f"{t:.1f}", (x, t), ha="center", va="bottom")
    xs = range(len(names))
    update = [(runs[n]["upload_update_bytes_per_client"] or 0) / 1e3 for n in names]
    total = [(runs[n]["upload_total_bytes_per_client"] or 0) / 1e3 for n in names]
    ax_b.bar([x - 0.2 for x in xs], update, width=0.4, label="model-update payload", color="tab:orange")
    ax_b.bar([x + 0.2 for x in xs], total, width=0.4, label="all training replies", color="tab:gray")
    ax_b.set_xticks(list(xs), labels)
    ax_b.set(ylabel="kB uploaded per client per round", title="upload")
    ax_b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-samples", type=int, default=0, help="0 = full MNIST")
    parser.add_argument("--max-test-samples", type=int, default=0, help="0 = full test set")
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument(
        "--methods", default="none,paillier_offline,threshold_offline_t2,threshold_offline_t5,threshold_offline_t2_b15,secaggplus",
        help="none, paillier, paillier_offline (single key), threshold (t=2, online), threshold_offline_t<T>, secaggplus",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every method")
    parser.add_argument("--curve", default="2,3,4,5,6,8,10", help="thresholds t for the measured cost curve ('' = off)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_secagg"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = {v for v in variants if v not in LABELS and not THRESHOLD_OFFLINE.match(v)}
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; valid: {', '.join(LABELS)}")
    key_dir = (args.out / "keys").resolve()
    if any(v.startswith("paillier") for v in variants):
        make_keys(key_dir, args.key_bits)
    repeats = [{v: run_one(v, args, key_dir, r) for v in variants} for r in range(args.repeats)]
    runs = summarise(repeats)
    result = {
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU only)",
        "load_average_1m_at_end": os.getloadavg()[0],
        "settings": {
            "rounds": args.rounds, "seed": args.seed, "max_train_samples": args.max_train_samples,
            "max_test_samples": args.max_test_samples, "key_bits": args.key_bits, "repeats": args.repeats,
        },
        "runs": runs,
        "ratios": ratios(runs, repeats),
    }
    threshold_runs = [run for run in runs.values() if run.get("threshold")]
    costs = None
    if threshold_runs and args.curve:
        from fedapp.crypto.protocol import settings_for

        cfg = compose_experiment(["+experiment=secagg_mnist", f"secagg.key_bits={args.key_bits}"])
        from fedapp.components import new_model
        from fedapp.training import get_weights

        num_values = sum(a.size for a in get_weights(new_model(cfg)))
        n_ct = settings_for(cfg.secagg, 10).layout.num_ciphertexts(num_values)
        costs = threshold_costs(args.key_bits, n_ct, [int(t) for t in args.curve.split(",")])
        result["threshold_costs"] = costs
    result["verdict"] = verdict(runs, result["ratios"], costs)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "secagg.json").write_text(json.dumps(result, indent=2))
    data = "full MNIST" if args.max_train_samples == 0 else f"MNIST, {args.max_train_samples} train samples"
    plot(runs, args.results_dir / "secagg.png", f"Secure aggregation, {data}, 10 clients, {args.rounds} rounds, {args.key_bits}-bit Paillier key")
    for name, run in runs.items():
        print(
            f"{run['label']:>16}: final {100 * run['final_test_accuracy']:.2f} %, "
            f"{run['mean_round_time_s']:.2f} s/round (median of {run['round_time_s_per_repeat']}), update {run['upload_update_bytes_per_client'] / 1e3:.1f} kB, "
            f"all replies {run['upload_total_bytes_per_client'] / 1e3:.1f} kB per client per round"
        )
    print(json.dumps(result["verdict"], indent=1))
    for name, r in result["ratios"].items():
        print(f"{name}: {json.dumps({k: v if v is None or isinstance(v, list) else round(v, 3) for k, v in r.items()})}")


if __name__ == "__main__":
    main()
