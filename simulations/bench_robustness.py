"""Byzantine-robustness matrix: aggregation rule x attack x partition, full MNIST, 20 clients, 20 % malicious.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_robustness.py            # the full matrix
    python simulations/bench_robustness.py --defense detect                           # detector acting
    python simulations/bench_robustness.py --max-train-samples 3000 --rounds 2 \\
        --strategies fedavg,median --attacks none,scaling --partitions iid             # a smoke run

Every cell is one run of the ``robust_mnist`` preset in the simulation engine
with ``strategy=<rule> attack=<attack> partition=<iid|dirichlet>``
(Dirichlet alpha 0.5), ``--model`` (default cnn_mnist_small: the 10-round,
60-run matrix takes about 75 minutes on 2 cores) and ``--rounds`` (default 10).
By default the anomaly detector watches every run passively
(``--defense monitor``: it scores and flags each update and records
precision/recall against the ground truth, but drops and quarantines
nothing), so the rules are measured unaided and the detector is measured on
the same updates; ``--defense detect`` lets it act. Results: ``robustness.json`` (final and best test
accuracy, accuracy per round, wall time, and with ``--defense detect`` the
detector's precision/recall per round) and ``robustness.png`` (heatmap of final
accuracy, one panel per partition). Anything smaller than the full matrix
(for ``--defense detect``: less data, rounds or clients) is marked ``"reduced": true`` and, unless ``--results`` says otherwise, written to
``/tmp/fedapp_robustness_reduced/`` so it is never mistaken for the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedapp.hydra_config import compose_experiment  # noqa: E402
from fedapp.simulation import run_in_simulation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REDUCED = Path("/tmp/fedapp_robustness_reduced")
STRATEGIES = ("fedavg", "krum", "multikrum", "trimmedmean", "median")
ATTACKS = ("none", "signflip", "gaussian", "labelflip", "scaling", "alie")
PARTITIONS = ("iid", "dirichlet")
DETECTION_KEYS = ("flagged", "detect_precision", "detect_recall", "quarantined", "quarantine_precision", "quarantine_recall")


def run_cell(strategy: str, attack: str, partition: str, args: argparse.Namespace) -> dict[str, Any]:
    """One simulation; returns its accuracy, timing and detection figures."""
    overrides = [
        "+experiment=robust_mnist",
        f"strategy={strategy}",
        f"attack={attack}",
        f"partition={partition}",
        f"defense={'none' if args.defense == 'none' else 'detect'}",
        f"model={args.model}",
        f"partition.num_clients={args.num_clients}",
        f"attack.fraction={args.fraction}",
        f"strategy.num_malicious={round(args.fraction * args.num_clients)}",
        f"dataset.max_train_samples={args.max_train_samples}",
        f"seed={args.seed}",
    ]
    if args.defense == "monitor":  # score and flag, never drop or quarantine
        overrides += ["defense.drop_flagged=false", "defense.quarantine_below=0"]
    if args.rounds:
        overrides.append(f"num_rounds={args.rounds}")
    cfg = compose_experiment(overrides)
    cfg.name = f"robust_{strategy}_{attack}_{partition}_{args.defense}"
    cfg.runtime.output_dir = str(args.out / cfg.name)
    started = time.perf_counter()
    summary = run_in_simulation(cfg)
    wall = time.perf_counter() - started
    rows = json.loads((Path(cfg.runtime.output_dir) / "metrics.json").read_text())
    cell: dict[str, Any] = {
        "strategy": strategy,
        "attack": attack,
        "partition": partition,
        "defense": args.defense,
        "rounds": cfg.num_rounds,
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "accuracy_per_round": [(r["round"], r.get("test_accuracy")) for r in rows],
        "mean_round_time_s": summary["mean_round_time_s"],
        "total_wall_time_s": round(wall, 1),
        "output_dir": cfg.runtime.output_dir,
    }
    if args.defense != "none":
        cell["detection_per_round"] = [{"round": r["round"], **{k: r.get(k) for k in DETECTION_KEYS}} for r in rows if r["round"] > 0]
    return cell


def heatmap(cells: list[dict[str, Any]], strategies: list[str], attacks: list[str], partitions: list[str], path: Path, title: str) -> None:
    """Final test accuracy (%) per rule and attack, one panel per partition."""
    fig, axes = plt.subplots(1, len(partitions), figsize=(1.3 * len(attacks) * len(partitions) + 2, 0.6 * len(strategies) + 1.8), squeeze=False)
    for ax, partition in zip(axes[0], partitions):
        grid = np.full((len(strategies), len(attacks)), np.nan)
        for c in cells:
            if c["partition"] == partition and c["final_test_accuracy"] is not None:
                grid[strategies.index(c["strategy"]), attacks.index(c["attack"])] = 100 * c["final_test_accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for i in range(len(strategies)):
            for j in range(len(attacks)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white" if grid[i, j] < 60 else "black", fontsize=8)
        ax.set_xticks(range(len(attacks)), attacks, rotation=30)
        ax.set_yticks(range(len(strategies)), strategies)
        ax.set_title(partition)
    fig.colorbar(image, ax=axes[0].tolist(), label="final test accuracy (%)")
    fig.suptitle(title, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--defense", choices=("none", "monitor", "detect"), default="monitor",
                        help="detector off, watching only (default), or dropping/quarantining")
    parser.add_argument("--model", default="cnn_mnist_small", help="the robust_mnist preset's model by default")
    parser.add_argument("--rounds", type=int, default=10, help="0 = the preset's num_rounds")
    parser.add_argument("--max-train-samples", type=int, default=0, help="0 = all 60,000")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_robustness"), help="per-run output folders")
    parser.add_argument("--results", type=Path, default=None, help="where robustness.json/.png go")
    args = parser.parse_args()
    strategies, attacks, partitions = (args.strategies.split(","), args.attacks.split(","), args.partitions.split(","))
    subset = (set(strategies), set(attacks), set(partitions)) != (set(STRATEGIES), set(ATTACKS), set(PARTITIONS))
    reduced = (  # the acting detector is judged on chosen cells, so a subset is not "reduced" there
        args.max_train_samples > 0 or args.rounds < 10 or args.num_clients != 20 or args.fraction != 0.2
        or (subset and args.defense != "detect")
    )
    results_dir = args.results or (REDUCED if reduced else RESULTS)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "robustness" if args.defense in ("none", "monitor") else f"robustness_{args.defense}"
    cells: list[dict[str, Any]] = []
    for partition in partitions:
        for strategy in strategies:
            for attack in attacks:
                cell = run_cell(strategy, attack, partition, args)
                cells.append(cell)
                print(
                    f"{partition:9} {strategy:11} {attack:9}: final {100 * (cell['final_test_accuracy'] or 0):6.2f} %, "
                    f"{cell['total_wall_time_s']:.0f} s", flush=True,
                )
                result = {
                    "reduced": reduced,
                    "machine": f"{platform.node()} ({platform.machine()}, CPU only)",
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "cells": cells,
                }
                (results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    title = f"MNIST, {args.num_clients} clients, {100 * args.fraction:.0f} % malicious, defense={args.defense}"
    heatmap(cells, strategies, attacks, partitions, results_dir / f"{stem}.png", title + (" (REDUCED)" if reduced else ""))
    print(f"results in {results_dir / stem}.json/.png")


if __name__ == "__main__":
    main()
