"""The robustness summary judges the issue's figures from the matrix, cell by cell."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "robustness_summary.py"
spec = importlib.util.spec_from_file_location("robustness_summary", SCRIPT)
robustness_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(robustness_summary)


def cell(strategy: str, attack: str, accuracy: float, detection: list[tuple[float | None, float | None]] = ()) -> dict:
    return {
        "strategy": strategy, "attack": attack, "partition": "iid", "final_test_accuracy": accuracy,
        "detection_per_round": [
            {"round": i + 1, "detect_precision": p, "detect_recall": r} for i, (p, r) in enumerate(detection)
        ],
    }


def test_a_rule_more_than_two_points_below_attack_free_fedavg_misses_the_figure():
    cells = [cell("fedavg", "none", 0.98), cell("trimmedmean", "gaussian", 0.9550), cell("multikrum", "gaussian", 0.9750)]

    _, verdicts = robustness_summary.accuracy_tables(cells)

    assert verdicts == [("iid", "trimmedmean", "gaussian", False), ("iid", "multikrum", "gaussian", True)]


def test_detection_must_reach_the_mark_by_round_five_in_every_run():
    early = [(1.0, 1.0)] + [(None, 0.0)] * 5  # flagged at once, silent later: met
    too_late = [(1.0, 0.5)] * 5 + [(1.0, 1.0)]  # full recall only in round 6: missed
    cells = [cell("fedavg", "scaling", 0.1, early), cell("median", "scaling", 0.97, too_late),
             cell("fedavg", "gaussian", 0.1, early)]

    lines, verdicts = robustness_summary.detection_table(cells)

    assert dict(((p, a), ok) for p, a, ok in verdicts) == {("iid", "scaling"): False, ("iid", "gaussian"): True}
    assert any(line.startswith("| iid | scaling | 6 |") for line in lines)


def test_summary_names_what_was_missed(tmp_path):
    result = {"cells": [cell("fedavg", "none", 0.98), cell("multikrum", "scaling", 0.50, [(None, 0.0)] * 5)]}

    text = robustness_summary.summary(result)

    assert "0 of 1 cells met; missed: iid/multikrum/scaling" in text
    assert "0 of 1 met; missed: iid/scaling" in text
