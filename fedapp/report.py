"""What a person looks at after a run: a plot of accuracy and loss, and a summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from fedapp.metrics import read_jsonl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


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


# How the user-level epsilon in a round row (``central_epsilon``) is labelled, by its ``dp_mode``.
USER_LEVEL_LABELS = {
    "central": "central DP (user-level, trusted server)",
    "distributed": "distributed DP (user-level, against an\nhonest-but-curious server seeing only the sum)",
}


def user_level_mode(rows: list[dict[str, Any]]) -> str:
    """``central`` or ``distributed``: which mechanism produced the rows' ``central_epsilon``."""
    modes = {r["dp_mode"] for r in rows if r.get("dp_mode")}
    return modes.pop() if len(modes) == 1 else "central"


def plot_epsilon(clients: list[dict[str, Any]], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Cumulative epsilon per client per round (DP-SGD ledger) and the user-level epsilon, if any.

    The user-level curve is central DP's or, under Paillier with noise shares,
    distributed DP's (against the server, which sees only the noisy sum); when
    clients are subsampled, distributed DP's amplified epsilon for observers of
    the released models only is drawn too.
    """
    per_client: dict[str, list[tuple[int, float]]] = {}
    for rec in clients:
        if rec.get("epsilon") is not None:
            per_client.setdefault(str(rec["client"]), []).append((rec["round"], rec["epsilon"]))
    central = [(r["round"], r["central_epsilon"]) for r in rows if r.get("central_epsilon") is not None]
    released = [(r["round"], r["released_epsilon"]) for r in rows if r.get("released_epsilon") is not None]
    if not per_client and not central:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for client, pts in sorted(per_client.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
        ax.plot(*zip(*sorted(pts)), marker=".", lw=1, label=f"client {client}")
    if central:
        ax.plot(*zip(*central), color="black", lw=2, ls="--", label=USER_LEVEL_LABELS[user_level_mode(rows)])
    if released:
        label = "distributed DP, against observers\nof the released models only"
        ax.plot(*zip(*released), color="gray", lw=1.5, ls=":", label=label)
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="Privacy spent (whole run so far)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(per_client) > 4 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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


def write_report(
    rows: list[dict[str, Any]], output_dir: str | Path, title: str = "", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``summary.json`` and ``rounds.png`` in ``output_dir``; returns the summary (with ``extra`` keys first)."""
    out = Path(output_dir)
    summary = {**(extra or {}), **summarize(rows)}
    clients = read_jsonl(out / "clients.jsonl")
    epsilons: dict[str, float] = {}
    for rec in clients:
        if rec.get("epsilon") is not None:
            epsilons[str(rec["client"])] = max(epsilons.get(str(rec["client"]), 0.0), rec["epsilon"])
    if epsilons:
        summary["final_epsilon_per_client"] = dict(sorted(epsilons.items()))
        summary["final_epsilon_max"] = max(epsilons.values())
    central = [r["central_epsilon"] for r in rows if r.get("central_epsilon") is not None]
    if central:
        summary["final_central_epsilon"] = central[-1]
        summary["central_dp_mode"] = user_level_mode(rows)
    released = [r["released_epsilon"] for r in rows if r.get("released_epsilon") is not None]
    if released:
        summary["final_released_epsilon"] = released[-1]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if rows:
        plot_rounds(rows, out / "rounds.png", title)
        plot_epsilon(clients, rows, out / "epsilon.png")
    return summary


def privacy_utility_rows(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """One row per finished run: epsilon spent (max over clients), user-level epsilon, accuracy, noise, time.

    Reads only what the runs wrote (``experiment.json``, ``summary.json``,
    ``clients.jsonl``), so it works on a benchmark's runs and on a Hydra sweep alike.
    """
    rows = []
    for run_dir in map(Path, run_dirs):
        summary_file = run_dir / "summary.json"
        if not summary_file.exists():
            continue
        summary = json.loads(summary_file.read_text())
        experiment = json.loads((run_dir / "experiment.json").read_text())
        client_dp = experiment.get("privacy", {}).get("client", {})
        sigmas = {r.get("noise_multiplier") for r in read_jsonl(run_dir / "clients.jsonl")} - {None}
        rows.append(
            {
                "run": str(run_dir),
                "dp": bool(client_dp.get("enabled")),
                "target_epsilon": client_dp.get("target_epsilon") if client_dp.get("enabled") else None,
                "epsilon_spent": summary.get("final_epsilon_max"),
                "delta": client_dp.get("delta") if client_dp.get("enabled") else None,
                "noise_multiplier": max(sigmas) if sigmas else None,
                "user_level_dp": summary.get("central_dp_mode"),  # central | distributed | None
                "user_level_epsilon": summary.get("final_central_epsilon"),
                "final_test_accuracy": summary.get("final_test_accuracy"),
                "rounds": summary.get("rounds"),
                "mean_round_time_s": summary.get("mean_round_time_s"),
            }
        )
    return sorted(rows, key=lambda r: (not r["dp"], r["epsilon_spent"] or 0.0))


def format_privacy_utility(rows: list[dict[str, Any]]) -> str:
    """Fixed-width privacy-utility table (record-level DP-SGD epsilon, user-level epsilon if any)."""
    head = (("epsilon spent", 13), ("sigma", 7), ("user-level eps", 22), ("test acc %", 10), ("rounds", 6),
            ("s/round", 7))
    lines = ["  ".join(f"{name:>{width}}" for name, width in head)]
    for r in rows:
        eps = f"{r['epsilon_spent']:.3f}" if r["dp"] and r["epsilon_spent"] is not None else "no DP"
        sigma = f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] else "-"
        user = r.get("user_level_epsilon")
        user_eps = f"{user:.3f} ({r['user_level_dp']})" if user is not None else "-"
        acc = 100 * (r["final_test_accuracy"] or float("nan"))
        secs = r["mean_round_time_s"] or float("nan")
        lines.append(f"{eps:>13}  {sigma:>7}  {user_eps:>22}  {acc:>10.2f}  {r['rounds']:>6}  {secs:>7.1f}")
    return "\n".join(lines)


def plot_privacy_utility(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy against the whole-run epsilon: per client (DP-SGD) and user-level (central or distributed)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    dp = [(r["epsilon_spent"], 100 * r["final_test_accuracy"]) for r in rows if r["dp"] and r["epsilon_spent"]]
    if dp:
        ax.plot(*zip(*sorted(dp)), marker="o", label="DP-SGD (cumulative epsilon per client)")
        for eps, acc in dp:
            ax.annotate(f"{acc:.1f}", (eps, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    for mode in ("central", "distributed"):
        pts = [
            (r["user_level_epsilon"], 100 * r["final_test_accuracy"])
            for r in rows
            if r.get("user_level_dp") == mode and r["user_level_epsilon"] and r["final_test_accuracy"] is not None
        ]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="s", ls="-.", label=USER_LEVEL_LABELS[mode].replace("\n", " "))
    for r in rows:
        if not r["dp"] and r.get("user_level_epsilon") is None and r["final_test_accuracy"] is not None:
            ax.axhline(100 * r["final_test_accuracy"], ls="--", color="gray", label="no DP")
    ax.set_xscale("log")
    ax.set(xlabel="epsilon (delta = 1e-5), whole run", ylabel="test accuracy (%)", title=title or "Privacy vs utility")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
