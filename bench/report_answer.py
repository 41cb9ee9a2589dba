"""The report's first section, "Recommendation": the answer before the evidence — the best cell per time and
NFE budget with its distance from the noise floor, the Pareto set among usable cells in words, and the
diverged cells named with the reason."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from .report_analysis import (LOSS, OFF_SCALE_GAP, USABLE_FACTOR, MetricVerdict, best_per_budget, budget_timing_note,
                              floor_distance, times_overlap, timing_summary)
from .report_doc import Doc, cell_name, fmt, fmt_time, fmt_timed, plural

__all__ = ["primary_verdict", "recommendation_section", "diverged_reasons"]


def primary_verdict(verdicts: list[MetricVerdict]) -> Optional[MetricVerdict]:
    """The metric the recommendation is made on: the first one with a noise floor, else the first one."""
    with_floor = [v for v in verdicts if v.floor is not None]
    return (with_floor or verdicts or [None])[0]


def _cost(r) -> str:
    return f"{plural(int(r['nfe']), 'model call')}, {fmt_timed(r, ' s')}"


def _headline(v: MetricVerdict, n: int) -> str:
    """The answer in two sentences: the cheapest cell at the noise floor, and the best cell."""
    vals = v.d[v.column].astype(float)
    best = v.best()
    txt = (f"**On {v.label}** ({n:,} samples per cell; time = wall-clock for all of them): the best cell is "
           f"**{cell_name(best)}** ({fmt(best[v.column])}, {floor_distance(float(best[v.column]), v.floor)}; "
           f"{_cost(best)}).")
    if v.floor is not None and v.floor[1] > 0:
        within = vals >= v.floor[0] - v.floor[1] if v.higher else vals <= v.floor[0] + v.floor[1]
        at_floor = v.d[within & ~v.d.index.isin(v.off_scale)]
        if len(at_floor):
            cheap = at_floor.sort_values(["time_total_s", "nfe"]).iloc[0]
            ties = [cell_name(r) for _, r in at_floor.iterrows() if r.name != cheap.name and times_overlap(r, cheap)]
            tie = (f" Timed within its spread: {', '.join(ties)} — which of them is cheapest is not resolved."
                   if ties else "")
            if cheap.name == best.name:
                return txt + " It is also the cheapest cell within 1 sd of the noise floor." + tie
            txt += (f" The cheapest cell within 1 sd of the noise floor — as good as the metric can tell — is "
                    f"**{cell_name(cheap)}** ({fmt(cheap[v.column])}; {_cost(cheap)}).{tie}")
        else:
            txt += " No cell comes within 1 sd of the noise floor."
    return txt


def _budget_table(doc: Doc, v: MetricVerdict, x: str, unit: str) -> None:
    """One row per budget where the best cell changes (a row holds until the next one's budget)."""
    rows, last = [], object()
    for b, r in best_per_budget(v, x):
        key = None if r is None else float(r[v.column])  # the same value by another cell: no news
        if key == last:
            continue
        last = key
        budget = f"≤ {fmt_time(b)} s" if x == "time_total_s" else f"≤ {fmt(b)}"
        if r is None:
            rows.append([budget, "(no cell this cheap)", "–", "–", "–"])
            continue
        val = float(r[v.column])
        note = budget_timing_note(v, b, r) if x == "time_total_s" else ""
        rows.append([budget, f"{cell_name(r)} ({r['spacing']}; {_cost(r)})", fmt(val),
                     floor_distance(val, v.floor), "yes" if v.is_usable(val) else "no"]
                    + ([f"⚠ {note}" if note else "–"] if x == "time_total_s" else []))
    if rows:
        doc.table([unit, "best cell within it", v.label, "vs noise floor", "usable"]
                  + (["timing spread"] if x == "time_total_s" else []), rows)


def _pareto_words(v: MetricVerdict, front: list, x: str, what: str) -> str:
    """The usable Pareto set as a sentence, cheapest first, and the cheaper cells left out as unusable."""
    d = v.d.drop(index=v.off_scale)
    cost = (lambda r: fmt_timed(r, " s")) if x == "time_total_s" else (lambda r: plural(int(r["nfe"]), "call"))
    steps = []
    for k, i in enumerate(front):
        step = f"{cell_name(d.loc[i])} ({fmt(d.loc[i, v.column])}, {cost(d.loc[i])})"
        if x == "time_total_s" and k and times_overlap(d.loc[i], d.loc[front[k - 1]]):
            step += " ⚠ timed within the spread of the previous cell: which is faster is not resolved"
        steps.append(step)
    txt = f"By {what}: " + (" → ".join(steps) if steps else "no usable cell") + "."
    if front:
        first = float(d.loc[front[0], x])
        cheaper = d[(d[x].astype(float) < first) & (d[LOSS].astype(float) > v.limit)]
        if len(cheaper):
            worst = cheaper.sort_values(x).iloc[0]
            txt += (f" The {plural(len(cheaper), 'cheaper cell')} (from {cell_name(worst)}, "
                    f"{fmt(worst[v.column])}) are not usable.")
    return txt


def diverged_reasons(verdicts: list[MetricVerdict], df: pd.DataFrame, magnitude, primary) -> list[str]:
    """One line per diverged cell: the metrics it is off-scale in (value and factor above every in-scale cell),
    how far its samples went (``magnitude(row)`` → text or ""), and whether more steps of the solver help."""
    lines = []
    for i in dict.fromkeys(i for v in verdicts for i in v.off_scale):
        r = df.loc[i]
        parts = []
        for v in verdicts:
            if i in v.off_scale:
                rest = v.d[v.column].astype(float).drop(index=v.off_scale).max()
                parts.append(f"{v.label} {fmt(r[v.column], 2)} ({float(r[v.column]) / rest:,.0f}× the worst "
                             f"in-scale cell)")
        txt = (f"**{cell_name(r)}** ({r['spacing']} grid, NFE {fmt(r['nfe'])}): diverged — "
               + "; ".join(parts) + ".")
        mag = magnitude(r)
        if mag:
            txt += f" {mag}."
        if primary is not None:
            more = primary.usable[_same_solver_and_grid(primary.usable, r) & (primary.usable["steps"] > r["steps"])]
            if len(more):
                m = more.sort_values("steps").iloc[0]
                txt += (f" The same solver is usable from {plural(int(m['steps']), 'step')} "
                        f"({primary.label} {fmt(m[primary.column])}): the steps of its {r['spacing']} grid at "
                        f"{plural(int(r['steps']), 'step')} are too large for it — a step-size failure, not a "
                        "metric artefact.")
        lines.append(txt)
    return lines


def _same_solver_and_grid(d: pd.DataFrame, r: pd.Series) -> pd.Series:
    """The rows of ``d`` of ``r``'s solver on its kind of grid and, in a guided sweep, at its guidance scale —
    the cells that can show whether more steps of the same thing help."""
    same = (d["solver_label"] == r["solver_label"]) & (d["spacing"] == r["spacing"])
    if "guidance" in d.columns:
        g = d["guidance"].astype(float)
        same &= (g == float(r["guidance"])) | (g.isna() & pd.isna(r["guidance"]))
    return same


def recommendation_section(doc: Doc, verdicts: list[MetricVerdict], fronts: dict, df: pd.DataFrame, n: int,
                           magnitude) -> None:
    """Write the "Recommendation" section. ``fronts[(key, x)]`` = the usable Pareto set's row labels."""
    doc.h(2, "Recommendation")
    v = primary_verdict(verdicts)
    if v is None:
        doc.p("No cell succeeded with a finite metric: nothing to recommend (see Results).")
        return
    doc.p(_headline(v, n))
    doc.p(f"**Usable** means a metric value at most {USABLE_FACTOR:g}× the larger of the best cell's value and "
          f"the noise floor (here {v.label} {v.bound_words()}"
          + (f": for this higher-is-better metric, on the shortfall from {fmt(v.ideal)}" if v.higher else "")
          + f"); cells {'beyond' if v.higher else 'above'} it are shown as evidence but never "
          f"recommended. **Diverged** (drawn off-scale on the charts) means more than {OFF_SCALE_GAP:g}× above every "
          "cell below it, at the widest gap in the upper half of the values.")
    how, unstable = timing_summary(df)
    doc.p(how)
    if unstable:
        doc.p(unstable)
    doc.h(3, "Best cell per budget")
    doc.p("A row holds for larger budgets until the next row.")
    _budget_table(doc, v, "time_total_s", "wall-clock budget per cell")
    _budget_table(doc, v, "nfe", "NFE budget (model calls per sample)")
    doc.h(3, "Pareto set among usable cells")
    doc.bullets([_pareto_words(v, fronts.get((v.key, x), []), x, what)
                 for x, what in (("time_total_s", "wall-clock"), ("nfe", "NFE"))])
    others = [o for o in verdicts if o is not v]
    if others:
        doc.p("The other metrics:")
        doc.bullets([_other_metric_line(o) for o in others])
    reasons = diverged_reasons(verdicts, df, magnitude, v)
    if reasons:
        doc.h(3, "Diverged cells")
        doc.bullets(reasons)


def _other_metric_line(v: MetricVerdict) -> str:
    best = v.best()
    usable = v.usable.sort_values(["time_total_s", "nfe"])
    txt = (f"{v.label}: best {cell_name(best)} ({fmt(best[v.column])}, "
           f"{floor_distance(float(best[v.column]), v.floor)})")
    if len(usable):
        c = usable.iloc[0]
        txt += f"; cheapest usable ({v.bound_words()}): {cell_name(c)} ({fmt(c[v.column])}, {_cost(c)})"
    return txt + "."


def point_magnitude(reference: Optional[np.ndarray], load_preview):
    """``magnitude(row)`` for point models: how far the cell's previewed samples reach against the exact data."""
    def magnitude(r) -> str:
        data, kind = load_preview(r["cell_id"])
        if reference is None or data is None or kind != "points":
            return ""
        far, ref = float(np.abs(data).max()), float(np.abs(reference).max())
        return (f"Its samples reach |x| = {fmt(far, 3)} while the exact data stay within {fmt(ref, 2)}"
                if far > 2 * ref else "")
    return magnitude
