"""Read the robustness matrix and check it against the issue's figures.

    python simulations/robustness_summary.py [simulations/results/robustness.json]

Writes ``robustness_summary.md`` beside the JSON and prints it:

* final accuracy per rule x attack (one table per partition) and its distance
  in percentage points from attack-free FedAvg on the same partition;
* the figure "Trimmed Mean and Multi-Krum end within 2 pp of attack-free FedAvg
  under sign-flip, Gaussian, label-flip and scaling", cell by cell;
* the passive detector per attack, over every run of that attack and
  partition: the figure ("precision and recall >= 0.9 at flagging the
  malicious clients by round 5" under Gaussian, sign-flip and scaling) is met
  when every run has a round <= 5 whose flags reach both; the table also shows
  the worst run's first such round, its precision/recall in round 5 itself and
  the worst over rounds 5 to the end (a converged model makes some attacks
  harmless and hard to tell apart, which shows there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "robustness.json"
WITHIN_PP = 2.0
FIGURE_RULES = ("trimmedmean", "multikrum")
FIGURE_ATTACKS = ("signflip", "gaussian", "labelflip", "scaling")
DETECTION_ATTACKS = ("gaussian", "signflip", "scaling")
DETECTION_ROUND = 5


def accuracy_tables(cells: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str, str, bool]]]:
    """Markdown lines per partition, and the figure's verdict per (partition, rule, attack)."""
    lines: list[str] = []
    verdicts: list[tuple[str, str, str, bool]] = []
    partitions = sorted({c["partition"] for c in cells}, key=["iid", "dirichlet"].index)
    for partition in partitions:
        here = [c for c in cells if c["partition"] == partition]
        rules = list(dict.fromkeys(c["strategy"] for c in here))
        attacks = list(dict.fromkeys(c["attack"] for c in here))
        acc = {(c["strategy"], c["attack"]): 100 * (c["final_test_accuracy"] or 0.0) for c in here}
        base = acc.get(("fedavg", "none"))
        lines += [f"### {partition}: final test accuracy (%), difference to attack-free FedAvg (pp)", "",
                  "| rule | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
        for rule in rules:
            row = []
            for attack in attacks:
                if (rule, attack) not in acc:
                    row.append("-")
                    continue
                diff = acc[(rule, attack)] - base if base is not None else float("nan")
                row.append(f"{acc[(rule, attack)]:.2f} ({diff:+.2f})")
                if rule in FIGURE_RULES and attack in FIGURE_ATTACKS and base is not None:
                    verdicts.append((partition, rule, attack, diff >= -WITHIN_PP))
            lines.append(f"| {rule} | " + " | ".join(row) + " |")
        lines.append("")
    return lines, verdicts


def detection_table(cells: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """The passive detector per partition and attack, over all rules' runs (worst run shown)."""
    lines = ["### detector (passive, every rule's runs): worst run", "",
             f"| partition | attack | first round with P and R >= 0.9 | precision / recall in round {DETECTION_ROUND} "
             f"| worst P / R over rounds {DETECTION_ROUND}-end | runs |", "|---|---|---|---|---|---|"]
    verdicts: list[tuple[str, str, bool]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        if c["attack"] != "none" and c.get("detection_per_round"):
            groups.setdefault((c["partition"], c["attack"]), []).append(c)

    def worst(rows: list[dict[str, Any]], key: str) -> float:
        """Lowest value; a round with no flags has no precision (skipped) and recall 0."""
        values = [r[key] for r in rows if r[key] is not None]
        return min(values) if values else float("nan")

    for (partition, attack), runs in groups.items():
        firsts, at_round, later = [], [], []
        for run in runs:
            rows = sorted(run["detection_per_round"], key=lambda r: r["round"])
            good = [r["round"] for r in rows
                    if (r["detect_precision"] or 0) >= 0.9 and (r["detect_recall"] or 0) >= 0.9]
            firsts.append(good[0] if good else None)
            at_round += [r for r in rows if r["round"] == DETECTION_ROUND]
            later += [r for r in rows if r["round"] >= DETECTION_ROUND]
        first = None if None in firsts else max(firsts)
        lines.append(
            f"| {partition} | {attack} | {first if first is not None else 'never'} | "
            f"{worst(at_round, 'detect_precision'):.2f} / {worst(at_round, 'detect_recall'):.2f} | "
            f"{worst(later, 'detect_precision'):.2f} / {worst(later, 'detect_recall'):.2f} | {len(runs)} |"
        )
        if attack in DETECTION_ATTACKS:
            verdicts.append((partition, attack, first is not None and first <= DETECTION_ROUND))
    return lines + [""], verdicts


def summary(result: dict[str, Any]) -> str:
    cells = result["cells"]
    acc_lines, acc_verdicts = accuracy_tables(cells)
    det_lines, det_verdicts = detection_table(cells)
    missed = [f"{p}/{rule}/{a}" for p, rule, a, ok in acc_verdicts if not ok]
    det_missed = [f"{p}/{a}" for p, a, ok in det_verdicts if not ok]
    settings = result.get("settings", {})
    head = [
        f"# Robustness matrix{' (REDUCED)' if result.get('reduced') else ''}",
        "",
        f"{len(cells)} runs; settings: {json.dumps(settings)}",
        "",
        f"Figure 1 (trimmed mean and Multi-Krum within {WITHIN_PP:g} pp of attack-free FedAvg under "
        f"{', '.join(FIGURE_ATTACKS)}): {len(acc_verdicts) - len(missed)} of {len(acc_verdicts)} cells met"
        + (f"; missed: {', '.join(missed)}" if missed else ""),
        "",
        f"Figure 2 (detector precision and recall >= 0.9 by round {DETECTION_ROUND} under "
        f"{', '.join(DETECTION_ATTACKS)}, worst run): {len(det_verdicts) - len(det_missed)} of {len(det_verdicts)} met"
        + (f"; missed: {', '.join(det_missed)}" if det_missed else ""),
        "",
    ]
    return "\n".join(head + acc_lines + det_lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else RESULTS
    if not path.exists():
        print(f"no results at {path}: run simulations/bench_robustness.py first", file=sys.stderr)
        return 2
    text = summary(json.loads(path.read_text()))
    (path.parent / "robustness_summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
