"""What the report concludes from a results table, before it draws anything: which cells are usable, which
diverged (and are drawn off-scale), the best cell per time and NFE budget, the Pareto set among usable cells,
and the plain observations (monotonicity in steps, DPM-Solver++ vs DDIM at 10 steps, how guidance changes the best
solver and the steps it needs).

Most metrics are distances (lower is better); a score such as ``class_accuracy`` is higher-is-better
(:attr:`bench.metrics.MetricSpec.higher_is_better`): the rules then rank the cells by their *loss*, the distance
from the metric's ideal value (1 − accuracy), so "best", "usable" and the Pareto sets mean the same for both."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from . import metrics as M
from .report_doc import cell_name, fmt, fmt_time, fmt_timed, plural
from .results import METRIC_PREFIX, relative_spread, row_timing

__all__ = ["USABLE_FACTOR", "OFF_SCALE_GAP", "MetricVerdict", "usable_limit", "off_scale_cells", "judge_metric",
           "budget_ladder", "best_per_budget", "floor_distance", "observations", "UNSTABLE_SPREAD", "times_overlap",
           "orientation", "has_guidance",
           "unstable_cells", "budget_timing_note", "timing_summary"]

# A cell is usable when its metric is at most USABLE_FACTOR × max(the best cell's value, the noise floor): a
# fixed, stated factor above what the sweep shows is reachable (or, below the floor, indistinguishable).
USABLE_FACTOR = 5.0
# A cell is off-scale (diverged) when its value is more than OFF_SCALE_GAP × every value below it, measured at
# the widest gap in the upper half of the sorted values: a blow-up, not a slow convergence.
OFF_SCALE_GAP = 10.0
# A cell's timing is unstable when its passes spread more than ±10 % around their median (pyperf warns from a
# standard deviation of 10 % of the mean).
UNSTABLE_SPREAD = 0.10


LOSS = "_loss"  # the column of a verdict's cells holding each one's loss (lower is better, 0 = the ideal value)


def orientation(key: str) -> tuple[bool, float]:
    """(higher is better, ideal value) of a metric (a distance, lower is better, when the key is unknown)."""
    spec = M.METRICS.get(key)
    return (True, float(spec.ideal)) if spec is not None and spec.higher_is_better else (False, 0.0)


def has_guidance(df: pd.DataFrame) -> bool:
    """Whether a results table has cells with a guidance scale (a class-conditional model's sweep)."""
    return "guidance" in df.columns and bool(np.isfinite(pd.to_numeric(df["guidance"], errors="coerce")).any())


@dataclass
class MetricVerdict:
    """One metric's reading of the table: the cells it can judge (``d``, with each one's loss in the ``LOSS``
    column), the usable limit (on the loss), off-scale cells.  ``higher``: a higher-is-better metric, whose loss
    is ``ideal`` − value (none is off-scale: it is bounded)."""
    key: str
    label: str
    column: str
    floor: Optional[tuple[float, float]]
    d: pd.DataFrame
    limit: float
    off_scale: list = field(default_factory=list)
    higher: bool = False
    ideal: float = 0.0

    @property
    def usable(self) -> pd.DataFrame:
        """The cells within the usable limit (never an off-scale one)."""
        loss = self.d[LOSS].astype(float)
        return self.d[(loss <= self.limit) & ~self.d.index.isin(self.off_scale)]

    @property
    def bound(self) -> float:
        """The usable limit in the metric's own values: at most this (a distance) or at least this (a score)."""
        return self.ideal - self.limit if self.higher else self.limit

    def bound_words(self, digits: int = 3) -> str:
        """"≤ 0.42" (a distance) or "≥ 0.93" (a score)."""
        return f"{'≥' if self.higher else '≤'} {fmt(self.bound, digits)}"

    def is_usable(self, value: float) -> bool:
        """Whether a value of the metric is within the usable limit."""
        return (self.ideal - value if self.higher else value) <= self.limit

    def best(self, d: Optional[pd.DataFrame] = None) -> pd.Series:
        """The best of the cells ``d`` (default: every in-scale cell)."""
        d = self.d.drop(index=self.off_scale) if d is None else d
        return d.loc[d[LOSS].astype(float).idxmin()]


def usable_limit(values: np.ndarray, floor: Optional[tuple[float, float]]) -> float:
    """``USABLE_FACTOR`` × max(best value, noise-floor mean); the best value alone when there is no floor."""
    best = float(np.min(values))
    ref = max(best, floor[0]) if floor is not None and np.isfinite(floor[0]) else best
    return USABLE_FACTOR * ref


def off_scale_cells(values: pd.Series) -> list:
    """Index labels of the values above a gap of more than ``OFF_SCALE_GAP`` × in the upper half of the
    sorted values (the widest such gap); none when there is no such gap or fewer than 3 positive values."""
    v = values[np.isfinite(values.astype(float)) & (values.astype(float) > 0)].astype(float)
    if len(v) < 3:
        return []
    s = np.sort(v.to_numpy())[::-1]
    upper = s[: max(1, len(s) // 2) + 1]
    ratios = upper[:-1] / upper[1:]
    i = int(np.argmax(ratios))
    if ratios[i] <= OFF_SCALE_GAP:
        return []
    return list(v.index[v.to_numpy() >= s[i]])


def judge_metric(df: pd.DataFrame, key: str, label: str, floor) -> Optional[MetricVerdict]:
    """The verdict on one metric over the successful cells with a finite value (None when there are none).  A
    higher-is-better metric is judged on its loss (ideal − value; the floor's too) and has no off-scale cells."""
    col = METRIC_PREFIX + key
    d = df[(df["status"] == "ok") & np.isfinite(df[col].astype(float))].copy()
    if d.empty:
        return None
    higher, ideal = orientation(key)
    d[LOSS] = ideal - d[col].astype(float) if higher else d[col].astype(float)
    off = [] if higher else off_scale_cells(d[col])
    kept = d[LOSS].astype(float).drop(index=off)
    loss_floor = floor if floor is None or not higher else (ideal - floor[0], floor[1])
    return MetricVerdict(key, label, col, floor, d, usable_limit(kept.to_numpy(), loss_floor), off, higher, ideal)


def floor_distance(value: float, floor: Optional[tuple[float, float]]) -> str:
    """How far a value is from the noise floor: "1.5× the floor, within 1 sd" (or "no noise floor")."""
    if floor is None or not np.isfinite(floor[0]) or floor[0] <= 0:
        return "no noise floor"
    mean, sd = floor
    txt = f"{_count(value / mean)}× the floor"
    if sd > 0:
        k = (value - mean) / sd
        txt += ", within 1 sd" if abs(k) <= 1 else f", floor {'+' if k > 0 else '−'} {_count(abs(k))} sd"
    return txt


def _count(x: float) -> str:
    """A factor to 2 significant digits, whole numbers with separators from 100 on (0.44, 4.1, 64, 1,076)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def budget_ladder(lo: float, hi: float) -> list[float]:
    """The 1-2-5 budgets from the first one at or above ``lo`` to the first one at or above ``hi``."""
    out, e = [], math.floor(math.log10(lo)) - 1
    while not out or out[-1] < hi:
        for m in (1, 2, 5):
            b = float(f"{m}e{e}")
            if b >= lo * (1 - 1e-9) and (not out or out[-1] < hi):
                out.append(b)
        e += 1
    return out


def best_per_budget(v: MetricVerdict, x: str) -> list[tuple[float, Optional[pd.Series]]]:
    """For each budget of ``x`` (``time_total_s`` or ``nfe``): the best cell costing at most that, or None."""
    d = v.d.drop(index=v.off_scale)
    d = d[np.isfinite(d[x].astype(float)) & (d[x].astype(float) > 0)]
    if d.empty:
        return []
    xs = d[x].astype(float)
    out = []
    for b in budget_ladder(float(xs.min()), float(xs.max())):
        within = d[xs <= b * (1 + 1e-9)]
        out.append((b, v.best(within) if len(within) else None))
    return out


def times_overlap(a, b) -> bool:
    """Whether two cells' timed passes overlap ([fastest, slowest] of one meets the other's): which of them is
    faster is then not resolved by the measurement."""
    _, lo_a, hi_a, _ = row_timing(a)
    _, lo_b, hi_b, _ = row_timing(b)
    return lo_a <= hi_b and lo_b <= hi_a


def unstable_cells(df: pd.DataFrame) -> list[tuple[pd.Series, float]]:
    """The successful cells whose passes spread more than ``UNSTABLE_SPREAD`` around their median, with the
    spread, widest first."""
    out = []
    for _, r in df[df["status"] == "ok"].iterrows():
        median, lo, hi, repeats = row_timing(r)
        spread = relative_spread(median, lo, hi)
        if repeats > 1 and spread > UNSTABLE_SPREAD:
            out.append((r, spread))
    return sorted(out, key=lambda p: -p[1])


def timing_summary(df: pd.DataFrame) -> tuple[str, str]:
    """How the cells were timed, in one sentence, and the pyperf-style warning naming the unstable cells ("" when
    there are none)."""
    ok = df[df["status"] == "ok"]
    counts = sorted({row_timing(r)[3] for r in ok.to_dict("records")}) or [1]
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    how = (f"Times (total, model, solver, per sample) are the medians of each cell's timed passes ({n} per cell; "
           "warm-up excluded), ± half the range between its fastest and slowest pass; ⚠ marks a claim that the "
           "spread does not resolve."
           if counts[-1] > 1 else
           "Each cell was timed once (one pass; files from before the repeated passes, or --repeats 1): the "
           "spread of its time is not known.")
    unstable = unstable_cells(df)
    if not unstable:
        return how, ""
    worst = ", ".join(f"{cell_name(r)} {fmt_timed(r, ' s')}" for r, _ in unstable[:5])
    limit = f"±{UNSTABLE_SPREAD * 100:.0f} %"
    more = ", …" if len(unstable) > 5 else ""
    warn = (f"**Unstable timings:** {plural(len(unstable), 'cell')} spread more than {limit} around the median "
            f"({worst}{more}): compare their times with care, or rerun with --threads 1, more --repeats or on a "
            "quieter machine.")
    return how, warn


def budget_timing_note(v: MetricVerdict, budget: float, r: pd.Series) -> str:
    """Where the spread of the timings makes a wall-clock budget row uncertain: the chosen cell's slowest pass
    is over the budget, or a better cell timed over it has passes within it ("" when neither)."""
    notes = []
    _, _, hi, _ = row_timing(r)
    if hi > budget * (1 + 1e-9):
        notes.append(f"its slowest pass ({fmt_time(hi)} s) is over the budget")
    d = v.d.drop(index=v.off_scale)
    better = d[(d[LOSS].astype(float) < float(r[LOSS])) & (d["time_total_s"].astype(float) > budget)]
    close = [(float(b[LOSS]), b) for _, b in better.iterrows() if row_timing(b)[1] <= budget * (1 + 1e-9)]
    if close:
        _, b = min(close, key=lambda p: p[0])
        notes.append(f"{cell_name(b)} ({fmt(b[v.column])}, better) has passes within the budget "
                     f"({fmt_timed(b, ' s')}, fastest {fmt_time(row_timing(b)[1])} s)")
    return "; ".join(notes)


def _groups(d: pd.DataFrame):
    """(name, cells) per solver entry — per solver entry and guidance scale in a guided sweep."""
    if not has_guidance(d):
        return [(str(solver), g) for solver, g in d.groupby("solver_label", sort=False)]
    return [(f"{solver}, w = {w:g}", g) for (w, solver), g in d.groupby(["guidance", "solver_label"], sort=True)]


def _monotone_lines(d: pd.DataFrame, col: str, lab: str, floor, higher: bool = False, ideal: float = 0.0) -> list[str]:
    out = []
    sign = -1.0 if higher else 1.0
    floor_loss = None if floor is None else (ideal - floor if higher else floor)
    for name, g in _groups(d):
        g = g.sort_values("steps")
        vals, steps = g[col].to_numpy(float), g["steps"].to_numpy(int)
        if len(vals) < 2:
            continue
        worse = [(steps[i], vals[i], steps[i + 1], vals[i + 1]) for i in range(len(vals) - 1)
                 if sign * vals[i + 1] > sign * vals[i]]
        if not worse:
            out.append(f"{lab}, {name}: improves (or holds) with every increase in steps "
                       f"({fmt(vals[0])} at {plural(steps[0], 'step')} → {fmt(vals[-1])} at "
                       f"{plural(steps[-1], 'step')}).")
            continue
        losses = [(ideal - v if higher else v) for a in worse for v in (a[1], a[3])]
        near = floor_loss is not None and floor_loss > 0 and max(losses) < 2 * floor_loss
        txt = "; ".join(f"{fmt(v0)} at {plural(s0, 'step')} → {fmt(v1)} at {plural(s1, 'step')}"
                        for s0, v0, s1, v1 in worse)
        out.append(f"{lab}, {name}: NOT monotone in steps ({txt})"
                   + (" — all within 2× the noise floor, i.e. sampling noise of the metric" if near else "") + ".")
    return out


def _dpmpp_vs_ddim_lines(d: pd.DataFrame, col: str, lab: str, higher: bool = False) -> list[str]:
    at10 = d[d["steps"] == 10]
    w = at10["guidance"].fillna(-1.0) if "guidance" in at10.columns else pd.Series(-1.0, index=at10.index)
    out = []
    for _, a in at10[at10["solver"].str.startswith("dpmpp")].iterrows():
        for _, b in at10[(at10["solver"] == "ddim") & (w == w.loc[a.name])].iterrows():
            va, vb = float(a[col]), float(b[col])
            verdict = "equal to" if va == vb else ("better than" if (va > vb) == higher else "WORSE than")
            guided = f" (w = {float(a['guidance']):g})" if float(w.loc[a.name]) >= 0 else ""
            out.append(f"{lab} at 10 steps{guided}: {a['solver_label']} {fmt(va)} (NFE {fmt(a['nfe'])}) is {verdict} "
                       f"{b['solver_label']} {fmt(vb)} (NFE {fmt(b['nfe'])}).")
    return out


def _guidance_lines(d: pd.DataFrame, col: str, lab: str, loss: pd.Series) -> list[str]:
    """Per guidance scale: the best cell, and the fewest steps at which a cell comes within 10 % of it (in loss);
    then one line comparing the scales."""
    if not has_guidance(d):
        return []
    out, needs = [], []
    for w, g in d.groupby("guidance", sort=True):
        lw = loss.loc[g.index]
        best = g.loc[lw.idxmin()]
        close = g[lw <= float(lw.min()) * 1.1 if float(lw.min()) > 0 else lw <= float(lw.min())]
        first = close.sort_values(["steps", "time_total_s"]).iloc[0]
        needs.append(f"w = {w:g}: {first['solver_label']} from {plural(int(first['steps']), 'step')} "
                     f"(best {best['solver_label']} × {int(best['steps'])})")
        out.append(f"{lab}, guidance w = {w:g}: best {fmt(best[col])} by {cell_name(best)}; the fewest steps within "
                   f"10 % of it: {cell_name(first)} ({fmt(first[col])}, NFE {fmt(first['nfe'])}).")
    if len(needs) > 1:
        out.append(f"{lab}, how guidance changes the best solver and the steps it needs (first cell within 10 % of "
                   f"each scale's best): " + "; ".join(needs) + ".")
    return out


def observations(df: pd.DataFrame, keys: list[str], labels: dict, floors: dict) -> list[str]:
    """Plain statements read off the table: monotonicity in steps, DPM-Solver++ vs DDIM at 10 steps, the
    best cell and the cheapest cell within 10 % of it (per metric), and in a guided sweep how guidance changes
    the best solver and the steps it needs.  A higher-is-better metric is compared on its loss (ideal − value)."""
    ok = df[df["status"] == "ok"]
    out = []
    for k in keys:
        col = METRIC_PREFIX + k
        d = ok[np.isfinite(ok[col].astype(float))]
        if d.empty:
            continue
        lab, floor = labels.get(k, k), floors.get(k)
        higher, ideal = orientation(k)
        loss = ideal - d[col].astype(float) if higher else d[col].astype(float)
        out += _monotone_lines(d, col, lab, floor, higher, ideal) + _dpmpp_vs_ddim_lines(d, col, lab, higher)
        best = d.loc[loss.idxmin()]
        out.append(f"{lab}: best {fmt(best[col])} by {cell_name(best)} "
                   f"(NFE {fmt(best['nfe'])}, {fmt_time(best['time_total_s'])} s)"
                   + (f"; noise floor {fmt(floor)}" if floor is not None else "") + ".")
        tol = float(loss.min()) * 1.1 if float(loss.min()) > 0 else float(loss.min())
        cheap = d[loss <= tol].sort_values("time_total_s").iloc[0]
        if cheap["cell_key"] != best["cell_key"]:
            out.append(f"{lab}: the cheapest cell within 10% of the best is {cell_name(cheap)} "
                       f"({fmt(cheap[col])}, {fmt_time(cheap['time_total_s'])} s).")
        out += _guidance_lines(d, col, lab, loss)
    return out
