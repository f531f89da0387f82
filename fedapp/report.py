"""What a person looks at after a run: a plot of accuracy and loss, and a summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_rounds(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy and loss per round (federated validation too when recorded)."""
    out = Path(path)
    rounds = [r["round"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("test_accuracy", "test (server)"), ("federated_accuracy", "validation (clients)")):
        pts = [(r["round"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", label=label)
    for key, label in (("test_loss", "test (server)"), ("train_loss", "train (clients)")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o", label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title="Accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
        if rounds:
            ax.set_xlim(min(rounds), max(rounds))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summarize(rows: list[dict[str, Any]], target: float = 0.99) -> dict[str, Any]:
    """Final and best accuracy, rounds to ``target``, mean wall time per round."""
    trained = [r for r in rows if r["round"] > 0]
    accs = [(r["round"], r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]
    times = [r["round_time_s"] for r in trained if r.get("round_time_s") is not None]
    reached = [rnd for rnd, acc in accs if acc >= target and rnd > 0]
    return {
        "rounds": len(trained),
        "final_test_accuracy": accs[-1][1] if accs else None,
        "best_test_accuracy": max(a for _, a in accs) if accs else None,
        "final_test_loss": rows[-1].get("test_loss") if rows else None,
        f"rounds_to_{target:g}": reached[0] if reached else None,
        "mean_round_time_s": sum(times) / len(times) if times else None,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width round table for the terminal."""
    cols = [  # key, header, format spec, scale
        ("round", "round", "d", 1),
        ("test_accuracy", "test acc %", ".2f", 100),
        ("test_loss", "test loss", ".4f", 1),
        ("train_loss", "train loss", ".4f", 1),
        ("fit_clients", "clients", "d", 1),
        ("round_time_s", "time s", ".1f", 1),
    ]
    lines = ["  ".join(f"{head:>10}" for _, head, _, _ in cols)]
    for row in rows:
        cells = []
        for key, _, spec, scale in cols:
            value = row.get(key)
            cells.append(" " * 10 if value is None else f"{value * scale:>10{spec}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], output_dir: str | Path, title: str = "") -> dict[str, Any]:
    """``summary.json`` and ``rounds.png`` in ``output_dir``; returns the summary."""
    out = Path(output_dir)
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if rows:
        plot_rounds(rows, out / "rounds.png", title)
    return summary
