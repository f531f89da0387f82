"""Issue-2 figures: FedAvg on full MNIST, 10 clients, IID and Dirichlet(0.5), no DP.

    FEDAPP_DATA_ROOT=../shared/data python simulations/bench_fedavg_mnist.py [--rounds-iid 20 --rounds-dirichlet 30]

Runs both presets one after the other in the simulation engine (same machine,
same code) and writes ``simulations/results/fedavg_mnist.json`` and
``fedavg_mnist.png`` (test accuracy per round, both partitions).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedapp.hydra_config import compose_experiment  # noqa: E402
from fedapp.simulation import run_in_simulation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"fedavg_mnist_iid": 0.99, "fedavg_mnist_dirichlet": 0.985}


def run_one(preset: str, rounds: int, out_root: Path) -> dict:
    cfg = compose_experiment([f"+experiment={preset}", f"num_rounds={rounds}"])
    cfg.runtime.output_dir = str(out_root / preset)
    started = time.perf_counter()
    summary = run_in_simulation(cfg)
    wall = time.perf_counter() - started
    rows = json.loads((Path(cfg.runtime.output_dir) / "metrics.json").read_text())
    target = TARGETS[preset]
    reached = [r["round"] for r in rows if r["round"] > 0 and (r.get("test_accuracy") or 0) >= target]
    return {
        "preset": preset,
        "partition": cfg.partition.name,
        "alpha": cfg.partition.alpha if cfg.partition.name == "dirichlet" else None,
        "num_clients": cfg.partition.num_clients,
        "rounds": rounds,
        "target_accuracy": target,
        "rounds_to_target": reached[0] if reached else None,
        "target_met": bool(reached),
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "mean_round_time_s": summary["mean_round_time_s"],
        "total_wall_time_s": round(wall, 1),
        "accuracy_per_round": [(r["round"], r.get("test_accuracy")) for r in rows],
        "config": cfg.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-iid", type=int, default=20)
    parser.add_argument("--rounds-dirichlet", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_fedavg_mnist"))
    args = parser.parse_args()
    runs = [
        run_one("fedavg_mnist_iid", args.rounds_iid, args.out),
        run_one("fedavg_mnist_dirichlet", args.rounds_dirichlet, args.out),
    ]
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": f"{platform.node()} ({platform.machine()}, CPU only)", "runs": runs}
    (RESULTS / "fedavg_mnist.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        pts = [(r, 100 * a) for r, a in run["accuracy_per_round"] if a is not None and r > 0]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{run['preset']} (final {100 * run['final_test_accuracy']:.2f} %)")
        ax.axhline(100 * run["target_accuracy"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set(xlabel="round", ylabel="test accuracy (%)", title="FedAvg, full MNIST, 10 clients", ylim=(95, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fedavg_mnist.png", dpi=110)
    for run in runs:
        print(
            f"{run['preset']}: final {100 * run['final_test_accuracy']:.2f} %, rounds to "
            f"{100 * run['target_accuracy']:.1f} %: {run['rounds_to_target']}, {run['mean_round_time_s']:.1f} s/round"
        )


if __name__ == "__main__":
    main()
