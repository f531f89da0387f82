"""Cost of DP-SGD: one local epoch with Opacus vs without, same client, same batch size.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_dp_epoch.py [--repeats 5 --batch-size 64]

One MNIST client partition (6,000 samples: 10 IID clients, no validation split),
for ``cnn_mnist_small`` and ``cnn_mnist``. The private and the non-private epoch
are timed alternately in one process, ``--repeats`` times each, so machine load
affects both alike; medians and their ratio go to
``simulations/results/dp_epoch.json`` (target: DP epoch <= 2x non-private).
The DP epoch is what a client runs: Poisson sampling at q = 1/ceil(N/B),
per-sample clipping at C = 1, sigma = 1, the accountant stepping every batch,
per-sample gradients by expanded weights (fedapp's default) and, for
comparison, by Opacus's hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fedapp.components import client_data, new_model
from fedapp.config import ExperimentConfig
from fedapp.privacy import PrivacyLedger, make_private, plan_client_dp
from fedapp.training import make_optimizer, train_epochs

RESULTS = Path(__file__).resolve().parent / "results"


def experiment(model: str, batch_size: int) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "dataset": {"name": "mnist", "val_fraction": 0.0, "download": False},
            "partition": {"name": "iid", "num_clients": 10},
            "model": {"name": model},
            "client": {"batch_size": batch_size, "lr": 0.05, "momentum": 0.9},
            "privacy": {"client": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}},
        }
    )


def plain_epoch(cfg: ExperimentConfig, train) -> float:  # noqa: ANN001 - torch Dataset
    model = new_model(cfg)
    loader = DataLoader(train, batch_size=cfg.client.batch_size, shuffle=True)
    optimizer = make_optimizer(cfg.client, model.parameters())
    started = time.perf_counter()
    train_epochs(model, loader, optimizer, 1)
    return time.perf_counter() - started


def private_epoch(cfg: ExperimentConfig, train, mode: str) -> tuple[float, int]:  # noqa: ANN001
    model = new_model(cfg)
    loader = DataLoader(train, batch_size=cfg.client.batch_size, shuffle=True)
    optimizer = make_optimizer(cfg.client, model.parameters())
    plan = plan_client_dp(cfg.privacy.client, num_samples=len(train), batch_size=cfg.client.batch_size, local_epochs=1, num_rounds=1)
    ledger = PrivacyLedger(plan.accountant)
    started = time.perf_counter()  # make_private is part of every private round
    dp_model, dp_optimizer, dp_loader = make_private(
        model, optimizer, loader, plan=plan, ledger=ledger, grad_sample_mode=mode
    )
    train_epochs(dp_model, dp_loader, dp_optimizer, 1)
    elapsed = time.perf_counter() - started
    dp_model.cleanup()
    return elapsed, ledger.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a client gets 1 CPU by default)")
    parser.add_argument("--models", nargs="+", default=["cnn_mnist_small", "cnn_mnist"])
    parser.add_argument(
        "--modes", nargs="+", default=["ew", "hooks"], help="Opacus grad_sample_mode(s); the first is fedapp's default"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name in args.models:
        cfg = experiment(name, args.batch_size)
        train, _ = client_data(cfg, 0)
        plain_epoch(cfg, train)  # warm-up: caches, allocator, hooks
        for mode in args.modes:
            private_epoch(cfg, train, mode)
        plain: list[float] = []
        private: dict[str, list[float]] = {mode: [] for mode in args.modes}
        steps = 0
        for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
            plain.append(plain_epoch(cfg, train))
            for mode in args.modes:
                seconds, steps = private_epoch(cfg, train, mode)
                private[mode].append(seconds)
        plain_median = statistics.median(plain)
        row = {
            "model": name,
            "train_samples": len(train),
            "batch_size": args.batch_size,
            "dp_steps_per_epoch": steps,
            "plain_epoch_s": [round(t, 3) for t in plain],
            "plain_median_s": round(plain_median, 3),
            "dp": {
                mode: {
                    "epoch_s": [round(t, 3) for t in times],
                    "median_s": round(statistics.median(times), 3),
                    "ratio": round(statistics.median(times) / plain_median, 3),
                }
                for mode, times in private.items()
            },
        }
        default = row["dp"][args.modes[0]]
        row["dp_median_s"], row["ratio"] = default["median_s"], default["ratio"]
        row["target_met"] = row["ratio"] <= 2.0
        results.append(row)
        for mode, r in row["dp"].items():
            print(f"{name}: plain {plain_median:.2f} s, DP[{mode}] {r['median_s']:.2f} s, ratio {r['ratio']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "command": f"python simulations/bench_dp_epoch.py --repeats {args.repeats} --batch-size {args.batch_size} "
        f"--threads {args.threads} --modes {' '.join(args.modes)}",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, CPU only, torch threads {args.threads})",
        "torch": torch.__version__,
        "grad_sample_modes": args.modes,
        "ratio_is_for": f"grad_sample_mode={args.modes[0]} (fedapp's default)",
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "target_ratio": 2.0,
        "results": results,
    }
    (RESULTS / "dp_epoch.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
