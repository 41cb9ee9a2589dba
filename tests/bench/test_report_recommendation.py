"""The report answers first: the Recommendation section (best cell per budget, distance from the noise floor,
usable Pareto set, diverged cells with the reason), diverged cells drawn off-scale, one colour per solver,
plurals and wall-clock digits. The rules are recomputed here from results.csv and reference.json."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
import torch

from bench import charts
from bench import run as run_mod
from bench.report_analysis import USABLE_FACTOR, budget_ladder, floor_distance, judge_metric, off_scale_cells
from bench.report_answer import diverged_reasons, primary_verdict, recommendation_section
from bench.report_doc import Doc, plural

# Heun at 2 steps on the Karras grid blows up (FD ~1e4) on the exact mixture; ddim converges; ddpm has no ODE
# error, so its absence from that chart must not shift the other colours.
SWEEP = ["--model", "gmm2d", "--num-samples", "200", "--solvers", "ddim,ddpm,heun", "--steps", "1,2,10",
         "--threads", "1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("report") / "gmm2d"
    try:
        assert run_mod.main(["--quiet", "--out", str(out), *SWEEP]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _section(md: str, title: str) -> str:
    """The text of a Markdown section (## or ###) up to the next heading of any level."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", md, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def test_the_report_opens_with_the_recommendation_naming_the_best_cell(sweep):
    md = (sweep / "report.md").read_text()
    df = pd.read_csv(sweep / "results.csv")
    assert re.findall(r"^## (.+)$", md, re.M)[0] == "Recommendation"
    assert md.index("## Recommendation") < md.index("## Setup") < md.index("## Results")
    sane = df[df["metric.fd_data"] < 1e3]  # heun × 2 (FD ~1e4) is the diverged cell
    best = sane.loc[sane["metric.fd_data"].idxmin()]
    floor = json.loads((sweep / "reference.json").read_text())["metrics"]["fd_data"]["floor"]
    head = _section(md, "Recommendation")
    assert f"the best cell is **{best['solver_label']} × {int(best['steps'])} steps**" in head
    assert f"{best['metric.fd_data'] / floor[0]:.2g}× the floor" in head


def test_the_pareto_list_opens_with_a_usable_cell_and_states_the_rule(sweep):
    md = (sweep / "report.md").read_text()
    df = pd.read_csv(sweep / "results.csv")
    floor = json.loads((sweep / "reference.json").read_text())["metrics"]["fd_data"]["floor"][0]
    fd = df["metric.fd_data"]
    limit = USABLE_FACTOR * max(fd[fd < 1e3].min(), floor)
    assert f"FD (data space) ≤ {limit:.3g})" in md  # the rule is stated with its number
    line = re.search(r"^- By wall-clock: (.*)$", _section(md, "Pareto set among usable cells"), re.M).group(1)
    first = re.match(r"(\w+) × (\d+) steps? \(([0-9.e+-]+), ", line)
    solver, steps, value = first.group(1), int(first.group(2)), float(first.group(3))
    row = df[(df["solver_label"] == solver) & (df["steps"] == steps)].iloc[0]
    assert row["metric.fd_data"] <= limit and np.isclose(row["metric.fd_data"], value, rtol=1e-3)
    one_step = df[df["steps"] == 1]["metric.fd_data"]
    assert (one_step > limit).all() and "are not usable" in line  # the 1-step cells are left out, and said so


def test_the_diverged_cell_is_named_with_the_reason(sweep):
    md = (sweep / "report.md").read_text()
    df = pd.read_csv(sweep / "results.csv").set_index(["solver_label", "steps"])
    div = _section(md, "Diverged cells")
    assert div.count("\n- ") + div.startswith("- ") == 1 and "**heun × 2 steps** (karras grid, NFE 3)" in div
    number = r"([0-9]+(?:\.[0-9]+)?)"
    far = re.search(rf"Its samples reach \|x\| = {number} while the exact data stay within {number}", div)
    assert float(far.group(1)) > 10 * float(far.group(2))
    assert f"FD (data space) {df.loc[('heun', 2), 'metric.fd_data']:.2g}" in div
    assert "The same solver is usable from 10 steps" in div
    assert "| ok (diverged) |" in md and md.count("(diverged)") == 1


def test_plurals_and_wall_clock_digits(sweep):
    md = (sweep / "report.md").read_text()
    assert not re.search(r"\b1 (steps|model calls|calls|cells|samples)\b", md)
    assert re.search(r"× 1 step\b", md)  # the 1-step cells, named in the singular
    assert plural(1, "step") == "1 step" and plural(2, "step") == "2 steps" and plural(3, "process", "processes") \
        == "3 processes"
    rows = [r for r in md.splitlines() if r.startswith("| ddim | defaults |") or r.startswith("| heun | defaults |")]
    assert len(rows) == 6  # ddim and heun × 3
    for r in rows:
        cells = r.split("|")
        time_s, spread = re.fullmatch(r" (\S+)(?: ±(\S+) %)? ", cells[6]).groups()  # "0.153 ±4 %": the passes' spread
        assert spread is None or 1 <= len(spread.replace(",", "").replace(".", "").strip("0")) <= 2, (cells[6], r)
        for cell in [time_s] + cells[8:11]:  # time s, (passes,) model s, solver s, ms/sample
            mantissa = cell.strip().split("e")[0].replace(".", "").lstrip("0")
            assert 1 <= len(mantissa) <= 3, (cell, r)


def test_charts_keep_one_colour_per_solver_and_draw_diverged_cells_off_scale(sweep, monkeypatch):
    saved = {}
    original = matplotlib.figure.Figure.savefig

    def capture(fig, path, *a, **k):
        ax = fig.axes[0]
        saved[Path(path).name] = {"ylim": ax.get_ylim(), "texts": [t.get_text() for t in ax.texts],
                                  "colours": {ln.get_label(): ln.get_color() for ln in ax.lines
                                              if not ln.get_label().startswith("_")}}
        return original(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    from bench import report
    assert report.main([str(sweep), "--quiet"]) == 0
    df = pd.read_csv(sweep / "results.csv").set_index(["solver_label", "steps"])
    colours = charts.solver_colours(df.reset_index()["solver_label"])
    for name in ("fd_data_vs_time.png", "fd_data_vs_nfe.png", "swd_vs_nfe.png", "ode_error_vs_time.png"):
        c = saved[name]
        assert c["colours"]["ddim"] == colours["ddim"] and c["colours"]["heun"] == colours["heun"], name
        key = name.split("_vs_")[0]
        diverged = df.loc[("heun", 2), f"metric.{key}"]
        assert c["ylim"][1] < diverged / 10, name  # the blow-up does not set the axis
        assert any(t.startswith("heun × 2:") and "off-scale" in t for t in c["texts"]), name
    assert len(set(colours.values())) == 3
    assert charts.solver_colours(["ddim", "heun"])["heun"] == charts.solver_colours(["heun", "ddim"])["heun"]


def test_off_scale_rule_budgets_and_floor_distance():
    s = pd.Series([1.6e4, 22.0, 15.6, 15.6, 3.0, 0.06, 0.02, 0.007], index=list("abcdefgh"))
    assert off_scale_cells(s) == ["a"]
    assert off_scale_cells(pd.Series([10.5, 4.34, 1.81, 0.41])) == []  # steady convergence: nothing off-scale
    assert off_scale_cells(pd.Series([1e4, 1.0])) == []  # too few values to call a gap
    assert budget_ladder(0.0016, 0.99) == [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert budget_ladder(1, 99) == [1, 2, 5, 10, 20, 50, 100]
    assert floor_distance(0.021, (0.0145, 0.011)) == "1.4× the floor, within 1 sd"
    assert floor_distance(15.6, (0.0145, 0.011)) == "1,076× the floor, floor + 1,417 sd"
    assert floor_distance(0.1, None) == "no noise floor"


def test_sample_panels_keep_titles_readable_in_a_1100_px_column():
    # Panels wrap at PANEL_COLUMNS, so the figure is never wider than the report column and the titles are
    # never scaled down: ≥ 10 px as shown (the browser test measures the shown width).
    width_px = charts.PANEL_FIGURE_WIDTH_IN * charts.PANEL_DPI
    assert width_px <= 1100
    assert charts.PANEL_TITLE_PT * charts.PANEL_DPI / 72 * 760 / width_px >= 10  # down to a 760 px column


# -- the primary metric, the diverged cells and the headline, on small tables -------------------------------
def _table(rows):
    """A results table: (solver, steps, value of metric a, value of metric b) per cell."""
    return pd.DataFrame([dict(solver_label=s, steps=n, spacing="karras", nfe=2 * n - 1, status="ok",
                              **{"metric.a": a, "metric.b": b}) for s, n, a, b in rows])


def test_the_recommendation_is_made_on_the_first_metric_with_a_noise_floor():
    df = _table([("heun", 2, 1.0, 2.0), ("heun", 5, 0.5, 1.0)])
    no_floor = judge_metric(df, "a", "A", None)
    first, second = judge_metric(df, "b", "B", (0.1, 0.01)), judge_metric(df, "a", "A2", (0.1, 0.01))
    assert primary_verdict([no_floor, first, second]) is first
    assert primary_verdict([no_floor]) is no_floor and primary_verdict([]) is None


def test_a_diverged_cell_names_the_fewest_steps_at_which_its_solver_is_usable():
    df = _table([("heun", 2, 9e4, 1.0), ("heun", 5, 0.6, 1.0), ("heun", 10, 0.5, 1.0), ("heun", 20, 0.4, 1.0),
                 ("ddim", 2, 0.9, 1.0)])
    v = judge_metric(df, "a", "A", (0.3, 0.01))
    assert v.off_scale == [0] and set(v.usable["steps"]) == {5, 10, 20, 2}
    (line,) = diverged_reasons([v], df, lambda r: "", v)
    assert line.startswith("**heun × 2 steps** (karras grid, NFE 3): diverged — A 90,000 (100,000× the worst "
                           "in-scale cell).")  # 9e4 / 0.9, the worst of the others
    assert "The same solver is usable from 5 steps (A 0.6)" in line


def test_a_guided_cell_that_diverged_is_not_usable_from_its_own_step_count():
    df = _table([("heun", 2, 9e4, 1.0), ("heun", 2, 0.7, 1.0), ("heun", 5, 0.6, 1.0), ("ddim", 2, 0.9, 1.0)])
    df["guidance"] = [1.0, 3.0, 1.0, 1.0]
    v = judge_metric(df, "a", "A", (0.3, 0.01))
    (line,) = diverged_reasons([v], df, lambda r: "", v)
    assert line.startswith("**heun × 2 steps, w = 1** (karras grid")
    assert "The same solver is usable from 5 steps (A 0.6)" in line


@pytest.mark.parametrize("column, values", [("guidance", [1.0, 3.0, 1.0]), ("spacing", ["karras", "logsnr", "karras"])],
                         ids=["another-guidance", "another-grid"])
def test_a_diverged_cell_is_not_said_usable_from_a_cell_of_another_guidance_or_grid(column, values):
    """heun × 2 diverged; heun × 5 is usable only at another guidance scale (or on another grid), which says
    nothing about the steps of this cell's own grid."""
    df = _table([("heun", 2, 9e4, 1.0), ("heun", 5, 0.6, 1.0), ("ddim", 2, 0.9, 1.0)])
    df[column] = values
    v = judge_metric(df, "a", "A", (0.3, 0.01))
    (line,) = diverged_reasons([v], df, lambda r: "", v)
    assert line.startswith("**heun × 2 steps") and "usable from" not in line


def _recommendation(verdicts, df) -> str:
    doc = Doc()
    recommendation_section(doc, verdicts, {}, df, 100, lambda r: "")
    return doc.markdown()


def test_the_headline_of_a_higher_is_better_primary_looks_for_cells_at_or_above_its_floor():
    """Class accuracy (higher is better) with a floor of 0.98 ± 0.01: a cell at 0.975 is within 1 sd of it, one at
    0.5 is not, however cheap; the other metric is listed under "the other metrics", the primary is not."""
    df = _table([("ddim", 2, 3.0, 0.5), ("ddim", 10, 1.0, 0.975)])
    df["time_total_s"] = [0.1, 0.4]
    df["metric.class_accuracy"] = df["metric.b"]
    primary, other = judge_metric(df, "class_accuracy", "accuracy", (0.98, 0.01)), judge_metric(df, "a", "A", None)
    md = _recommendation([primary, other], df)
    assert "the best cell is **ddim × 10 steps**" in md
    assert "It is also the cheapest cell within 1 sd of the noise floor." in md and "is **ddim × 2 steps**" not in md
    assert "cells beyond it are shown as evidence" in md
    others = md[md.index("The other metrics:"):]
    assert [line.split(":")[0] for line in others.splitlines() if line.startswith("- ")][:1] == ["- A"]
    assert "- accuracy:" not in others


def test_a_floor_without_a_spread_makes_no_claim_about_1_sd():
    """A stored floor of a bare number has an unknown spread (sd 0): nothing is said about cells within 1 sd."""
    df = _table([("ddim", 2, 3.0, 0.5), ("ddim", 10, 1.0, 0.975)])
    df["time_total_s"] = [0.1, 0.4]
    md = _recommendation([judge_metric(df, "a", "A", (0.3, 0.0))], df)
    assert "the best cell is **ddim × 10 steps**" in md and "1 sd" not in md
    assert "cells above it are shown as evidence" in md
