"""What the report concludes from a results table, before it draws anything: which cells are usable, which
diverged (and are drawn off-scale), the best cell per time and NFE budget, the Pareto set among usable cells,
and the plain observations (monotonicity in steps, DPM-Solver++ vs DDIM at 10 steps)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from .report_doc import cell_name, fmt, fmt_time, fmt_timed, plural
from .results import METRIC_PREFIX, relative_spread, row_timing

__all__ = ["USABLE_FACTOR", "OFF_SCALE_GAP", "MetricVerdict", "usable_limit", "off_scale_cells", "judge_metric",
           "budget_ladder", "best_per_budget", "floor_distance", "observations", "UNSTABLE_SPREAD", "times_overlap",
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


@dataclass
class MetricVerdict:
    """One metric's reading of the table: the cells it can judge (``d``), the usable limit, off-scale cells."""
    key: str
    label: str
    column: str
    floor: Optional[tuple[float, float]]
    d: pd.DataFrame
    limit: float
    off_scale: list = field(default_factory=list)

    @property
    def usable(self) -> pd.DataFrame:
        """The cells within the usable limit (never an off-scale one)."""
        v = self.d[self.column].astype(float)
        return self.d[(v <= self.limit) & ~self.d.index.isin(self.off_scale)]


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
    """The verdict on one metric over the successful cells with a finite value (None when there are none)."""
    col = METRIC_PREFIX + key
    d = df[(df["status"] == "ok") & np.isfinite(df[col].astype(float))]
    if d.empty:
        return None
    off = off_scale_cells(d[col])
    kept = d[col].astype(float).drop(index=off)
    return MetricVerdict(key, label, col, floor, d, usable_limit(kept.to_numpy(), floor), off)


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
        out.append((b, within.loc[within[v.column].astype(float).idxmin()] if len(within) else None))
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
    better = d[(d[v.column].astype(float) < float(r[v.column])) & (d["time_total_s"].astype(float) > budget)]
    close = [(float(b[v.column]), b) for _, b in better.iterrows() if row_timing(b)[1] <= budget * (1 + 1e-9)]
    if close:
        _, b = min(close, key=lambda p: p[0])
        notes.append(f"{cell_name(b)} ({fmt(b[v.column])}, better) has passes within the budget "
                     f"({fmt_timed(b, ' s')}, fastest {fmt_time(row_timing(b)[1])} s)")
    return "; ".join(notes)


def _monotone_lines(d: pd.DataFrame, col: str, lab: str, floor) -> list[str]:
    out = []
    for solver, g in d.groupby("solver_label", sort=False):
        g = g.sort_values("steps")
        vals, steps = g[col].to_numpy(float), g["steps"].to_numpy(int)
        if len(vals) < 2:
            continue
        worse = [(steps[i], vals[i], steps[i + 1], vals[i + 1]) for i in range(len(vals) - 1)
                 if vals[i + 1] > vals[i]]
        if not worse:
            out.append(f"{lab}, {solver}: improves (or holds) with every increase in steps "
                       f"({fmt(vals[0])} at {plural(steps[0], 'step')} → {fmt(vals[-1])} at "
                       f"{plural(steps[-1], 'step')}).")
            continue
        near = floor is not None and floor > 0 and all(max(a[1], a[3]) < 2 * floor for a in worse)
        txt = "; ".join(f"{fmt(v0)} at {plural(s0, 'step')} → {fmt(v1)} at {plural(s1, 'step')}"
                        for s0, v0, s1, v1 in worse)
        out.append(f"{lab}, {solver}: NOT monotone in steps ({txt})"
                   + (" — all within 2× the noise floor, i.e. sampling noise of the metric" if near else "") + ".")
    return out


def _dpmpp_vs_ddim_lines(d: pd.DataFrame, col: str, lab: str) -> list[str]:
    at10 = d[d["steps"] == 10]
    out = []
    for _, a in at10[at10["solver"].str.startswith("dpmpp")].iterrows():
        for _, b in at10[at10["solver"] == "ddim"].iterrows():
            va, vb = float(a[col]), float(b[col])
            verdict = "better than" if va < vb else ("equal to" if va == vb else "WORSE than")
            out.append(f"{lab} at 10 steps: {a['solver_label']} {fmt(va)} (NFE {fmt(a['nfe'])}) is {verdict} "
                       f"{b['solver_label']} {fmt(vb)} (NFE {fmt(b['nfe'])}).")
    return out


def observations(df: pd.DataFrame, keys: list[str], labels: dict, floors: dict) -> list[str]:
    """Plain statements read off the table: monotonicity in steps, DPM-Solver++ vs DDIM at 10 steps, the
    best cell and the cheapest cell within 10 % of it (per metric)."""
    ok = df[df["status"] == "ok"]
    out = []
    for k in keys:
        col = METRIC_PREFIX + k
        d = ok[np.isfinite(ok[col].astype(float))]
        if d.empty:
            continue
        lab, floor = labels.get(k, k), floors.get(k)
        out += _monotone_lines(d, col, lab, floor) + _dpmpp_vs_ddim_lines(d, col, lab)
        best = d.loc[d[col].astype(float).idxmin()]
        out.append(f"{lab}: best {fmt(best[col])} by {cell_name(best)} "
                   f"(NFE {fmt(best['nfe'])}, {fmt_time(best['time_total_s'])} s)"
                   + (f"; noise floor {fmt(floor)}" if floor is not None else "") + ".")
        tol = float(best[col]) * 1.1 if float(best[col]) > 0 else float(best[col])
        cheap = d[d[col].astype(float) <= tol].sort_values("time_total_s").iloc[0]
        if cheap["cell_key"] != best["cell_key"]:
            out.append(f"{lab}: the cheapest cell within 10% of the best is {cell_name(cheap)} "
                       f"({fmt(cheap[col])}, {fmt_time(cheap['time_total_s'])} s).")
    return out
