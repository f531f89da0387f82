"""What a person looks at after a run: accuracy/loss and epsilon plots, ``summary.json`` and a terminal table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

from fedapp.metrics import read_jsonl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402


# Failure accounting columns of a round row (fedapp.rounds.outcomes.RoundTally.row), in table order.
OUTCOME_COLUMNS = ("trained", "declined", "refused", "failed", "timed_out", "node_lost")
FAULT_COLUMNS = ("refused", "failed", "timed_out", "node_lost")  # these sum to ``fit_failures``


class FailureMark(NamedTuple):
    """A round that lost clients: how many, and whether the whole round failed."""

    round: int
    failures: int
    round_failed: bool


def _fit_failures(row: dict[str, Any]) -> int:
    """The row's ``fit_failures``, or the sum of its fault columns when only those were recorded."""
    if row.get("fit_failures") is not None:
        return int(row["fit_failures"])
    return sum(int(row.get(f"fit_{col}") or 0) for col in FAULT_COLUMNS)


def failure_rounds(rows: list[dict[str, Any]]) -> list[FailureMark]:
    """Rounds that ``rounds.png`` marks: some client failed, or the round itself failed."""
    marks = [FailureMark(int(r["round"]), _fit_failures(r), bool(r.get("round_failed"))) for r in rows]
    return [m for m in marks if m.failures > 0 or m.round_failed]


FAILURE_STYLE: dict[str, Any] = {"color": "orange", "alpha": 0.25}
FAILED_ROUND_STYLE: dict[str, Any] = {"color": "red", "alpha": 0.35, "hatch": "//"}


def rounds_figure(rows: list[dict[str, Any]], title: str = "") -> Figure:
    """The figure of :func:`plot_rounds`, unsaved (tests inspect it)."""
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
    marks = failure_rounds(rows)
    for ax in (ax_acc, ax_loss):
        for m in marks:  # a band per round, so a lost client is seen next to the dip it caused
            style = FAILED_ROUND_STYLE if m.round_failed else FAILURE_STYLE
            ax.axvspan(m.round - 0.4, m.round + 0.4, **style, gid=f"failure-round-{m.round}")
        handles, _ = ax.get_legend_handles_labels()
        if any(not m.round_failed for m in marks):
            handles.append(Patch(**FAILURE_STYLE, label="clients failed (refused, error, timeout, lost)"))
        if any(m.round_failed for m in marks):
            handles.append(Patch(**FAILED_ROUND_STYLE, label="round failed (< min_fit_clients trained)"))
        if handles:
            ax.legend(handles=handles, fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        pad = 0.5 if marks else 0.0  # room for the edge rounds' bands
        if rounds and (pad or min(rounds) != max(rounds)):
            ax.set_xlim(min(rounds) - pad, max(rounds) + pad)
    top = blended_transform_factory(ax_acc.transData, ax_acc.transAxes)
    for m in marks:
        text = f"{m.failures} failed" + (", round failed" if m.round_failed else "")
        ax_acc.text(m.round, 0.02, text, transform=top, rotation=90, ha="center", va="bottom", fontsize=7,
                    color="darkred" if m.round_failed else "saddlebrown",
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1}, zorder=5)  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rounds(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy and loss per round (federated validation too when recorded); rounds with failures shaded."""
    out = Path(path)
    fig = rounds_figure(rows, title)
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


def budget_lines(experiment: dict[str, Any] | None) -> list[tuple[float, str]]:
    """(epsilon, label) of the horizontal lines ``epsilon.png`` draws for the client DP budget.

    The budget is where a DP-SGD client stops (``epsilon_budget``, else
    ``target_epsilon``, as :func:`fedapp.privacy.sigma_and_budget` sets it); a
    target below it is drawn too, as it is what sigma was calibrated for.
    """
    dp = ((experiment or {}).get("privacy") or {}).get("client") or {}
    if not dp.get("enabled"):
        return []
    target = float(dp.get("target_epsilon") or 0.0)
    budget = float(dp.get("epsilon_budget") or 0.0) or target
    lines = [(budget, f"client budget epsilon = {budget:g}")] if budget > 0 else []
    if 0 < target < budget:
        lines.append((target, f"target epsilon = {target:g}"))
    return lines


def delta_text(experiment: dict[str, Any] | None, rows: list[dict[str, Any]] | None = None) -> str:
    """``delta = 1e-05`` (or one delta per level when they differ): an epsilon means nothing without it."""
    privacy = (experiment or {}).get("privacy") or {}
    deltas: dict[str, float] = {}
    client = privacy.get("client") or {}
    if client.get("enabled") and client.get("delta") is not None:
        deltas["client"] = float(client["delta"])
    central = privacy.get("central") or {}
    secagg = (experiment or {}).get("secagg") or {}
    if rows and any(r.get("central_epsilon") is not None for r in rows):
        if user_level_mode(rows) == "distributed" and secagg.get("noise_delta") is not None:
            deltas["user-level"] = float(secagg["noise_delta"])
        elif central.get("delta") is not None:
            deltas["user-level"] = float(central["delta"])
    elif central.get("enabled") and central.get("delta") is not None:
        deltas["user-level"] = float(central["delta"])
    if not deltas:
        return ""
    if len(set(deltas.values())) == 1:
        return f"delta = {next(iter(deltas.values())):g}"
    return ", ".join(f"{level} delta = {d:g}" for level, d in deltas.items())


def _client_key(client: str) -> tuple[int, int | str]:
    return (0, int(client)) if client.isdigit() else (1, client)


def _same_curve(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        ra == rb and math.isclose(ea, eb, rel_tol=1e-9, abs_tol=1e-12) for (ra, ea), (rb, eb) in zip(a, b)
    )


def group_identical(per_client: dict[str, list[tuple[int, float]]]) -> list[tuple[list[str], list[tuple[int, float]]]]:
    """Clients whose epsilon curves coincide, grouped (in client order), so one line stands for all of them.

    Clients with equal data and settings spend exactly the same epsilon; drawn
    one per client, their curves hide each other and all but the last vanish.
    """
    groups: list[tuple[list[str], list[tuple[int, float]]]] = []
    for client in sorted(per_client, key=_client_key):
        curve = sorted(per_client[client])
        for members, shared in groups:
            if _same_curve(curve, shared):
                members.append(client)
                break
        else:
            groups.append(([client], curve))
    return groups


def clients_label(members: list[str]) -> str:
    """``client 3``, or ``clients 0-4, 7 (identical)``: runs of numeric ids shortened to ranges."""
    if len(members) == 1:
        return f"client {members[0]}"
    numeric = sorted(int(c) for c in members if c.isdigit())
    parts: list[str] = []
    i = 0
    while i < len(numeric):
        j = i
        while j + 1 < len(numeric) and numeric[j + 1] == numeric[j] + 1:
            j += 1
        parts.append(f"{numeric[i]}-{numeric[j]}" if j > i + 1 else ", ".join(map(str, numeric[i : j + 1])))
        i = j + 1
    parts += sorted(c for c in members if not c.isdigit())
    return f"clients {', '.join(parts)} (identical)"


MAX_LABELLED_GROUPS = 16  # beyond this a legend hides the plot; the rest are drawn unlabelled
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def epsilon_figure(
    clients: list[dict[str, Any]], rows: list[dict[str, Any]], experiment: dict[str, Any] | None = None
) -> Figure | None:
    """The figure of :func:`plot_epsilon`, unsaved (tests inspect it); None when no epsilon was recorded."""
    per_client: dict[str, list[tuple[int, float]]] = {}
    for rec in clients:
        if rec.get("epsilon") is not None:
            per_client.setdefault(str(rec["client"]), []).append((rec["round"], rec["epsilon"]))
    central = [(r["round"], r["central_epsilon"]) for r in rows if r.get("central_epsilon") is not None]
    released = [(r["round"], r["released_epsilon"]) for r in rows if r.get("released_epsilon") is not None]
    if not per_client and not central:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = group_identical(per_client)
    for i, (members, pts) in enumerate(groups):
        # marker and line style cycle at different periods, so nearby curves still differ in shape
        label = clients_label(members) if i < MAX_LABELLED_GROUPS else None
        ax.plot(*zip(*pts), marker=_MARKERS[i % len(_MARKERS)], ls=_LINESTYLES[(i // len(_MARKERS)) % len(_LINESTYLES)],
                ms=4, lw=1, label=label)  # fmt: skip
    if len(groups) > MAX_LABELLED_GROUPS:
        ax.plot([], [], color="gray", lw=1, label=f"... {len(groups) - MAX_LABELLED_GROUPS} more client curves")
    if central:
        ax.plot(*zip(*central), color="black", lw=2, ls="--", label=USER_LEVEL_LABELS[user_level_mode(rows)])
    if released:
        label = "distributed DP, against observers\nof the released models only"
        ax.plot(*zip(*released), color="gray", lw=1.5, ls=":", label=label)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for value, label in budget_lines(experiment):
        is_budget = label.startswith("client budget")
        # black, not a cycle colour, so the budget is never taken for a client's curve
        ax.axhline(value, color="black", lw=1, ls="-" if is_budget else ":", label=label,
                   gid="budget" if is_budget else "target")  # fmt: skip
        ax.text(0.01, value, f"{'budget' if is_budget else 'target'} {value:g}", transform=right, fontsize=7,
                va="bottom", ha="left")  # fmt: skip
    delta = delta_text(experiment, rows)
    title = "Privacy spent (whole run so far)" + (f", {delta}" if delta else "")
    ax.set(xlabel="round", ylabel="cumulative epsilon", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if min(len(groups), MAX_LABELLED_GROUPS) > 4 else 1)
    fig.tight_layout()
    return fig


def plot_epsilon(
    clients: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    path: str | Path,
    *,
    experiment: dict[str, Any] | None = None,
) -> Path | None:
    """Cumulative epsilon per client per round (DP-SGD ledger) and the user-level epsilon, if any.

    The user-level curve is central DP's or, under Paillier with noise shares,
    distributed DP's (against the server, which sees only the noisy sum); when
    clients are subsampled, distributed DP's amplified epsilon for observers of
    the released models only is drawn too. With ``experiment``
    (``ExperimentConfig.to_dict()``) the client budget is drawn and delta named.
    """
    fig = epsilon_figure(clients, rows, experiment)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def failure_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Client outcomes summed over rounds, failed rounds and all fit failures (None: nothing was recorded)."""
    recorded = [
        r for r in rows
        if r.get("round_failed") or r.get("fit_failures") is not None
        or any(r.get(f"fit_{col}") is not None for col in OUTCOME_COLUMNS)
    ]  # fmt: skip
    if not recorded:
        return {"failures": None, "failed_rounds": None, "fit_failures": None}
    return {
        "failures": {col: sum(int(r.get(f"fit_{col}") or 0) for r in recorded) for col in OUTCOME_COLUMNS},
        "failed_rounds": sum(1 for r in recorded if r.get("round_failed")),
        "fit_failures": sum(_fit_failures(r) for r in recorded),
    }


def summarize(rows: list[dict[str, Any]], target: float = 0.99) -> dict[str, Any]:
    """Final and best accuracy, rounds to ``target``, mean wall time per round, failure totals."""
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
        **failure_totals(rows),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width round table for the terminal; failed rounds are starred and explained below."""
    cols = [  # key, header, format spec, scale
        ("round", "round", "d", 1),
        ("test_accuracy", "test acc %", ".2f", 100),
        ("test_loss", "test loss", ".4f", 1),
        ("train_loss", "train loss", ".4f", 1),
        ("fit_clients", "clients", "d", 1),
        ("fit_failures", "failures", "d", 1),
        ("round_time_s", "time s", ".1f", 1),
    ]
    lines = ["  ".join(f"{head:>10}" for _, head, _, _ in cols)]
    for row in rows:
        cells = []
        for key, _, spec, scale in cols:
            value = row.get(key)
            if key == "fit_failures" and row.get("round_failed"):
                cells.append(f"{_fit_failures(row):>9d}*")
            else:
                cells.append(" " * 10 if value is None else f"{value * scale:>10{spec}}")
        lines.append("  ".join(cells))
    if any(r.get("round_failed") for r in rows):
        lines.append("* round failed: fewer clients than strategy.min_fit_clients trained")
    return "\n".join(lines)


def _read_experiment(out: Path) -> dict[str, Any] | None:
    """``experiment.json`` of a run, if it was written (the budget and delta live there)."""
    path = out / "experiment.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def write_report(
    rows: list[dict[str, Any]], output_dir: str | Path, title: str = "", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``summary.json``, ``rounds.png`` and ``epsilon.png`` in ``output_dir``; the summary (``extra`` keys first)."""
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
        plot_epsilon(clients, rows, out / "epsilon.png", experiment=_read_experiment(out))
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
