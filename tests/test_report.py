"""What a run's report shows: failure accounting, the epsilon budget and delta, clients told apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import Polygon, Rectangle

from fedapp.config import ExperimentConfig
from fedapp.metrics import RunRecorder
from fedapp.report import (
    FailureMark,
    budget_lines,
    clients_label,
    delta_text,
    epsilon_figure,
    failure_rounds,
    format_table,
    group_identical,
    rounds_figure,
    summarize,
    write_report,
)


def _round(rnd: int, trained: int, **faults: Any) -> dict[str, Any]:
    """A round row as the fit step writes it: outcome counts, fit_failures, round_failed when it failed."""
    counts = {k: faults.pop(k, 0) for k in ("declined", "refused", "failed", "timed_out", "node_lost")}
    row = {"round": rnd, "test_accuracy": 0.5 + rnd / 100, "test_loss": 1.0 / rnd, "fit_trained": trained}
    row |= {f"fit_{k}": v for k, v in counts.items()}
    row["fit_sampled"] = trained + sum(counts.values())
    row["fit_failures"] = counts["refused"] + counts["failed"] + counts["timed_out"] + counts["node_lost"]
    return row | faults


ROWS = [
    {"round": 0, "test_accuracy": 0.1, "test_loss": 2.3},  # initial evaluation: no fit columns
    _round(1, 3),
    _round(2, 2, failed=1),
    _round(3, 3, declined=1),  # a decline is not a failure
    _round(4, 1, timed_out=1, node_lost=1, round_failed=True),
    _round(5, 0, refused=2, failed=1, round_failed=True),
    _round(6, 3),
]


def _spans(ax: plt.Axes) -> dict[int, Any]:
    """The failure bands of an axis, by round (axvspan gives a Rectangle, or a Polygon in older matplotlib)."""
    return {
        int(p.get_gid().rsplit("-", 1)[1]): p
        for p in ax.patches
        if isinstance(p, (Rectangle, Polygon)) and (p.get_gid() or "").startswith("failure-round-")
    }


def test_failure_rounds_marks_exactly_the_rounds_that_lost_clients() -> None:
    marks = failure_rounds(ROWS)

    assert marks == [FailureMark(2, 1, False), FailureMark(4, 2, True), FailureMark(5, 3, True)]


def test_failure_rounds_sums_the_fault_columns_when_fit_failures_is_missing() -> None:
    rows = [{"round": 1, "fit_trained": 1, "fit_refused": 1, "fit_node_lost": 2}, {"round": 2, "round_failed": True}]

    assert failure_rounds(rows) == [FailureMark(1, 3, False), FailureMark(2, 0, True)]


def test_summary_totals_the_outcomes_over_rounds() -> None:
    summary = summarize(ROWS)

    assert summary["failures"] == {"trained": 12, "declined": 1, "refused": 2, "failed": 2, "timed_out": 1,
                                   "node_lost": 1}  # fmt: skip
    assert summary["fit_failures"] == 6
    assert summary["failed_rounds"] == 2
    assert summary["rounds"] == 6


def test_summary_says_unknown_when_no_failure_accounting_was_recorded() -> None:
    summary = summarize([{"round": 1, "test_accuracy": 0.9, "test_loss": 0.3}])

    assert summary["failures"] is None and summary["fit_failures"] is None and summary["failed_rounds"] is None


def test_table_has_a_failures_column_and_stars_failed_rounds() -> None:
    lines = format_table(ROWS).splitlines()
    width = 12  # cells of 10 characters, two spaces apart
    cells = [[line[i : i + width].strip() for i in range(0, len(lines[0]), width)] for line in lines[: len(ROWS) + 1]]
    column = {head: i for i, head in enumerate(cells[0])}
    failures = {int(row[0]): row[column["failures"]] for row in cells[1:]}

    assert failures == {0: "", 1: "0", 2: "1", 3: "0", 4: "2*", 5: "3*", 6: "0"}
    assert lines[-1].startswith("* round failed")
    assert not format_table(ROWS[:3]).splitlines()[-1].startswith("*")


def test_rounds_plot_shades_only_failing_rounds_and_labels_them() -> None:
    fig = rounds_figure(ROWS)
    try:
        ax_acc, ax_loss = fig.axes
        for ax in (ax_acc, ax_loss):
            spans = _spans(ax)
            assert sorted(spans) == [2, 4, 5]
            assert spans[4].get_hatch() == "//" and spans[5].get_hatch() == "//"
            assert not spans[2].get_hatch()  # failed rounds look different from rounds that only lost clients
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert any(t.startswith("clients failed") for t in legend)
            assert any(t.startswith("round failed") for t in legend)
            assert all(float(tick).is_integer() for tick in ax.get_xticks())
        texts = sorted(t.get_text() for t in ax_acc.texts)
        assert texts == ["1 failed", "2 failed, round failed", "3 failed, round failed"]
    finally:
        plt.close(fig)


def test_rounds_plot_without_failures_has_no_bands() -> None:
    fig = rounds_figure([_round(1, 3), _round(2, 3)])
    try:
        assert all(not _spans(ax) for ax in fig.axes)
        assert not fig.axes[0].texts
    finally:
        plt.close(fig)


def test_identical_curves_are_grouped_and_different_ones_kept_apart() -> None:
    same = [(1, 0.5), (2, 0.9), (3, 1.2)]
    per_client = {
        "10": list(same),
        "0": list(same),
        "1": list(reversed(same)),  # order of arrival does not matter
        "2": list(same),
        "3": [(1, 0.5), (2, 0.9), (3, 1.2000001)],  # close is not identical
        "4": [(1, 0.5), (2, 0.9)],  # a client that stopped early
    }

    groups = group_identical(per_client)

    assert [members for members, _ in groups] == [["0", "1", "2", "10"], ["3"], ["4"]]
    assert groups[0][1] == same


def test_client_labels_shorten_runs_of_ids() -> None:
    assert clients_label(["3"]) == "client 3"
    assert clients_label(["0", "1", "2", "3", "4"]) == "clients 0-4 (identical)"
    assert clients_label(["0", "1", "2", "7", "9", "10"]) == "clients 0-2, 7, 9, 10 (identical)"


def _dp_experiment(**client: Any) -> dict[str, Any]:
    cfg = ExperimentConfig.from_dict({"privacy": {"client": {"enabled": True, **client}}})
    return cfg.to_dict()


def test_budget_line_follows_the_client_budget() -> None:
    assert budget_lines(_dp_experiment(target_epsilon=3.0)) == [(3.0, "client budget epsilon = 3")]
    assert budget_lines(_dp_experiment(target_epsilon=3.0, epsilon_budget=4.5)) == [
        (4.5, "client budget epsilon = 4.5"),
        (3.0, "target epsilon = 3"),
    ]
    assert budget_lines(_dp_experiment(noise_multiplier=1.1)) == []  # sigma given, no cap
    assert budget_lines({"privacy": {"client": {"enabled": False, "target_epsilon": 3.0}}}) == []
    assert budget_lines(None) == []


def test_delta_is_named_once_or_per_level_when_they_differ() -> None:
    client_only = _dp_experiment(target_epsilon=3.0, delta=1e-5)
    assert delta_text(client_only) == "delta = 1e-05"
    both = ExperimentConfig.from_dict(
        {"privacy": {"client": {"enabled": True, "target_epsilon": 3.0}, "central": {"enabled": True, "delta": 1e-6}}}
    ).to_dict()
    rows = [{"round": 1, "central_epsilon": 0.4, "dp_mode": "central"}]
    assert delta_text(both, rows) == "client delta = 1e-05, user-level delta = 1e-06"
    distributed = {"secagg": {"noise_delta": 1e-7}, "privacy": {"central": {"enabled": False, "delta": 1e-5}}}
    assert delta_text(distributed, [{"round": 1, "central_epsilon": 0.4, "dp_mode": "distributed"}]) == "delta = 1e-07"
    assert delta_text(None) == ""


def test_epsilon_plot_draws_the_budget_states_delta_and_tells_identical_clients_apart() -> None:
    extra = {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.4}  # clients 0-2 spend the same, 3 more
    clients = [{"round": rnd, "client": c, "epsilon": eps + extra[c]} for rnd, eps in ((1, 0.8), (2, 1.3)) for c in extra]
    fig = epsilon_figure(clients, [], experiment=_dp_experiment(target_epsilon=2.0, delta=1e-5))
    assert fig is not None
    try:
        (ax,) = fig.axes
        budget = [line for line in ax.lines if line.get_gid() == "budget"]
        assert len(budget) == 1 and set(budget[0].get_ydata()) == {2.0}
        assert "delta = 1e-05" in ax.get_title()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "clients 0-2 (identical)" in legend and "client 3" in legend
        assert "client budget epsilon = 2" in legend
        curves = [line for line in ax.lines if line.get_label().startswith("client")]
        assert len({(line.get_marker(), line.get_linestyle()) for line in curves}) == len(curves)
        assert all(float(tick).is_integer() for tick in ax.get_xticks())
    finally:
        plt.close(fig)


def test_write_report_reads_the_budget_and_writes_failure_totals(tmp_path: Path) -> None:
    run = tmp_path / "run"
    recorder = RunRecorder(run)
    for row in ROWS[1:]:
        recorder.record(row["round"], **{k: v for k, v in row.items() if k != "round"})
        for client in ("0", "1"):
            recorder.client(row["round"], client, epsilon=0.3 * row["round"])
    (run / "experiment.json").write_text(json.dumps(_dp_experiment(target_epsilon=2.5)))

    summary = write_report(recorder.table(), run, title="faults")

    written = json.loads((run / "summary.json").read_text())
    assert written["failures"] == summary["failures"] and written["failures"]["timed_out"] == 1
    assert written["failed_rounds"] == 2 and written["fit_failures"] == 6
    assert written["final_epsilon_max"] == pytest.approx(1.8)
    assert (run / "rounds.png").stat().st_size > 0 and (run / "epsilon.png").stat().st_size > 0
