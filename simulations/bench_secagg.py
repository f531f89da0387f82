"""Secure aggregation side by side: the same experiment in the clear, with Paillier and with SecAgg+.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_secagg.py            # the figures
    python simulations/bench_secagg.py --rounds 2 --max-train-samples 5000 --key-bits 512 \\
        --results-dir /tmp/secagg_smoke --out /tmp/secagg_smoke/runs                # smoke

Runs preset ``secagg_mnist`` (full MNIST, 10 clients IID, cnn_mnist_small,
FedAvg, same seed and rounds) once per ``--methods`` entry, one after the other
in the simulation engine: ``none``, ``paillier`` (``--key-bits``, 2048 for the
figures) and ``secaggplus``; ``--pool`` adds ``paillier`` with the background
obfuscator pool (``secagg.pool_dir``). The Paillier key pair is made before the
runs with ``python -m fedapp.keys generate`` into the output folder, in its own
process: the ServerApp only ever loads the public key.

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
LABELS = {"none": "plaintext", "paillier": "Paillier", "paillier_pool": "Paillier + pool", "secaggplus": "SecAgg+"}


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


def run_one(variant: str, args: argparse.Namespace, key_dir: Path) -> dict[str, Any]:
    method = "paillier" if variant.startswith("paillier") else variant
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
    if variant == "paillier_pool":
        overrides.append(f"secagg.pool_dir={args.out / 'pools'}")
    cfg = compose_experiment(overrides)
    cfg.runtime.output_dir = str(args.out / variant)
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
        "label": LABELS[variant],
        "final_test_accuracy": summary["final_test_accuracy"],
        "mean_round_time_s": mean("round_time_s", steady),
        "mean_round_time_all_rounds_s": mean("round_time_s", rows),
        "upload_update_bytes_per_client": mean("upload_update_bytes", rows),
        "upload_total_bytes_per_client": mean("upload_total_bytes", rows),
        "total_wall_time_s": round(wall, 1),
        "per_round": [
            {k: r.get(k) for k in ("round", "round_time_s", "upload_update_bytes", "upload_total_bytes", "test_accuracy", "fit_clients")}
            for r in rows
        ],
        "config": cfg.to_dict(),
    }


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each secure variant against plaintext: time and bytes as ratios, accuracy in percentage points."""
    base = runs.get("none")
    if base is None:
        return {}

    def ratio(run: dict[str, Any], key: str) -> float | None:
        return run[key] / base[key] if run[key] is not None and base[key] else None

    return {
        f"{name}/plaintext": {
            "round_time": ratio(run, "mean_round_time_s"),
            "update_bytes": ratio(run, "upload_update_bytes_per_client"),
            "total_bytes": ratio(run, "upload_total_bytes_per_client"),
            "accuracy_diff_pp": 100 * (run["final_test_accuracy"] - base["final_test_accuracy"]),
        }
        for name, run in runs.items()
        if name != "none"
    }


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
    parser.add_argument("--methods", default="none,paillier,secaggplus")
    parser.add_argument("--pool", action="store_true", help="also run Paillier with the background obfuscator pool")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_secagg"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = [m.strip() for m in args.methods.split(",") if m.strip()] + (["paillier_pool"] if args.pool else [])
    unknown = set(variants) - set(LABELS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; valid: none, paillier, secaggplus")
    key_dir = (args.out / "keys").resolve()
    if any(v.startswith("paillier") for v in variants):
        make_keys(key_dir, args.key_bits)
    runs = {v: run_one(v, args, key_dir) for v in variants}
    result = {
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU only)",
        "load_average_1m_at_end": os.getloadavg()[0],
        "settings": {
            "rounds": args.rounds, "seed": args.seed, "max_train_samples": args.max_train_samples,
            "max_test_samples": args.max_test_samples, "key_bits": args.key_bits,
        },
        "runs": runs,
        "ratios": ratios(runs),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "secagg.json").write_text(json.dumps(result, indent=2))
    data = "full MNIST" if args.max_train_samples == 0 else f"MNIST, {args.max_train_samples} train samples"
    plot(runs, args.results_dir / "secagg.png", f"Secure aggregation, {data}, 10 clients, {args.rounds} rounds, {args.key_bits}-bit Paillier key")
    for name, run in runs.items():
        print(
            f"{run['label']:>16}: final {100 * run['final_test_accuracy']:.2f} %, "
            f"{run['mean_round_time_s']:.1f} s/round, update {run['upload_update_bytes_per_client'] / 1e3:.1f} kB, "
            f"all replies {run['upload_total_bytes_per_client'] / 1e3:.1f} kB per client per round"
        )
    for name, r in result["ratios"].items():
        print(f"{name}: {json.dumps({k: None if v is None else round(v, 3) for k, v in r.items()})}")


if __name__ == "__main__":
    main()
