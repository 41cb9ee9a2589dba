"""Charts of a results table (matplotlib, Agg): quality against wall-clock and against NFE with the Pareto
frontier marked, and the samples of every cell (an image grid, or a scatter for point models)."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

__all__ = ["pareto_front", "usable_front", "solver_colours", "metric_chart", "sample_panels", "PANEL_TITLE_PT",
           "PANEL_DPI", "PANEL_FIGURE_WIDTH_IN"]


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated by another (lower x and lower y are better), sorted by x.

    A point is on the front when every point at most as costly (x) is worse (y): the best quality available
    for its budget.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    order = ok[np.lexsort((y[ok], x[ok]))]
    front, best = [], math.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)


def usable_front(df: pd.DataFrame, column: str, x: str, off_scale=(), usable_max: Optional[float] = None,
                 higher_is_better: bool = False) -> list[int]:
    """The index labels of the Pareto-optimal cells of ``df`` (ok, finite, x > 0, not off-scale) among those
    within ``usable_max`` (at most it; at least it for a higher-is-better metric), cheapest first."""
    d = df[(df["status"] == "ok") & np.isfinite(df[column].astype(float))]
    d = d[np.isfinite(d[x].astype(float)) & (d[x].astype(float) > 0) & ~d.index.isin(set(off_scale))]
    xs, ys = d[x].to_numpy(float), d[column].to_numpy(float)
    sign = -1.0 if higher_is_better else 1.0
    judged = sign * ys <= sign * usable_max if usable_max is not None else np.ones(len(ys), bool)
    return [int(d.index[i]) for i in np.flatnonzero(judged)[pareto_front(xs[judged], sign * ys[judged])]]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plain_text(draw):
    """``draw`` with every text it gives matplotlib drawn as written: a model name or label with ``$``, ``^{``
    or ``\\frac`` is never parsed as mathtext (a parse error would stop the whole report)."""
    @functools.wraps(draw)
    def drawn_as_written(*args, **kwargs):
        with _plt().rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)
    return drawn_as_written


def solver_colours(labels) -> dict:
    """A fixed colour per solver label, the same in every chart of a report: the labels sorted by name take
    the tab10 colours in turn (tab20 beyond 10 solvers), so a solver missing from one metric (ddpm has no ODE
    error) does not shift the others."""
    names = sorted({str(s) for s in labels})
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(names)}


def _y_limits(ys: np.ndarray, floor, usable_max) -> tuple[float, float, bool]:
    """(low, high, log scale) covering the in-scale values, the floor and the usable limit."""
    extra = [v for v in ((floor[0] if floor is not None else None), usable_max)
             if v is not None and np.isfinite(v) and v > 0]
    vals = np.concatenate([ys[np.isfinite(ys)], extra])
    lo, hi = float(vals.min()), float(vals.max())
    log = lo > 0 and hi / lo > 20
    if log:
        return lo / 1.6, hi * 1.6, True
    pad = 0.08 * (hi - lo if hi > lo else abs(hi) or 1.0)
    return lo - pad, hi + pad, False


def _plot_solvers(ax, d: pd.DataFrame, column: str, x: str, colours: dict, off: set, top: float) -> None:
    """One line per solver through its in-scale cells; off-scale cells as ▲ at the top edge, labelled with
    their value."""
    for lab, g in d.groupby("solver_label", sort=False):
        g = g.sort_values(x)
        colour = colours.get(str(lab))
        inside = g[~g.index.isin(off)]
        ax.plot(inside[x], inside[column], marker="o", ms=4, lw=1.4, label=lab, color=colour)
        if x == "time_total_s":
            _time_bars(ax, inside, column, colour)
        for _, r in inside.iterrows():
            ax.annotate(str(int(r["steps"])), (r[x], r[column]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color="0.35")
        for _, r in g[g.index.isin(off)].iterrows():
            ax.plot([r[x]], [top], marker="^", ms=8, color=colour, clip_on=False, zorder=6)
            ax.annotate(f"{lab} × {int(r['steps'])}: {float(r[column]):.2g} (off-scale)", (r[x], top),
                        textcoords="offset points", xytext=(6, -11), fontsize=7, color=colour)


def _time_bars(ax, g: pd.DataFrame, column: str, colour) -> None:
    """Horizontal bars from each cell's fastest to its slowest timed pass (none for one-pass cells)."""
    from .results import row_timing
    spans = np.array([row_timing(r)[:3] for r in g.to_dict("records")], dtype=float).reshape(-1, 3)
    if len(spans) and (spans[:, 2] > spans[:, 1]).any():
        ax.errorbar(spans[:, 0], g[column].to_numpy(float),
                    xerr=[spans[:, 0] - spans[:, 1], spans[:, 2] - spans[:, 0]], fmt="none", ecolor=colour,
                    elinewidth=0.9, capsize=2.5, alpha=0.7)


@_plain_text
def metric_chart(df: pd.DataFrame, column: str, label: str, x: str, path: Path,
                 floor: Optional[tuple[float, float]] = None, title: str = "", colours: Optional[dict] = None,
                 off_scale=(), usable_max: Optional[float] = None, higher_is_better: bool = False
                 ) -> Optional[list[int]]:
    """Plot ``column`` against ``x`` (``time_total_s`` or ``nfe``, log scale), one line per solver entry.

    Args:
        floor: (mean, sd) of the metric on reference data: drawn as a dotted line with a band.
        colours: solver label → colour (``solver_colours``); the default cycle when absent.
        off_scale: index labels of diverged cells: drawn as ▲ at the top edge, never setting the axis range.
        usable_max: the usable limit: drawn as a dash-dot line; the Pareto frontier is taken among the cells
            at or below it (at or above it for a higher-is-better metric).
        higher_is_better: a score such as an accuracy: the frontier is the highest value for its cost.

    Returns:
        The row positions (in ``df``) of the Pareto-optimal cells, or None when there is nothing to plot.
    """
    plt = _plt()
    d = df[(df["status"] == "ok") & np.isfinite(df[column].astype(float))]
    d = d[np.isfinite(d[x].astype(float)) & (d[x].astype(float) > 0)]
    if d.empty:
        return None
    off = set(off_scale) & set(d.index)
    inside = d[~d.index.isin(off)]
    xs, ys = inside[x].to_numpy(float), inside[column].to_numpy(float)
    lo, hi, log = _y_limits(ys, floor, usable_max) if len(ys) else (0.0, 1.0, False)
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    _plot_solvers(ax, d, column, x, colours or {}, off, hi)
    labels = usable_front(d, column, x, off, usable_max, higher_is_better)
    front = np.asarray([inside.index.get_loc(i) for i in labels], dtype=int)
    if len(front):
        ax.step(xs[front], ys[front], where="post", color="k", lw=0.8, ls="--", alpha=0.7)
        ax.scatter(xs[front], ys[front], s=90, facecolors="none", edgecolors="k", lw=1.1,
                   label="Pareto frontier" + (" (usable cells)" if usable_max is not None else ""), zorder=5)
    _mark_limits(ax, floor, usable_max)
    ax.set_xscale("log")
    if log:
        ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.set_xlabel({"time_total_s": "wall-clock per cell, s (log; median of passes, bars: fastest–slowest)",
                   "nfe": "NFE: model evaluations per sample (log)"}.get(x, x))
    ax.set_ylabel(f"{label} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return labels


def _mark_limits(ax, floor, usable_max) -> None:
    """The noise floor (dotted, with a ±sd band) and the usable limit (dash-dot)."""
    if floor is not None and np.isfinite(floor[0]) and floor[0] > 0:
        mean, sd = floor
        ax.axhline(mean, color="0.5", ls=":", lw=1.0, label="noise floor (reference data, mean ± sd)")
        if sd > 0:
            ax.axhspan(max(mean - sd, mean * 0.05), mean + sd, color="0.5", alpha=0.12, lw=0)
    if usable_max is not None and np.isfinite(usable_max):
        ax.axhline(usable_max, color="0.2", ls="-.", lw=0.8, alpha=0.6, label="usable limit")


def _mosaic(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """uint8 (N, 3, H, W) → one (rows·H, cols·W, 3) image with 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i].transpose(1, 2, 0)
    return out


PANEL_DPI = 100
PANEL_FIGURE_WIDTH_IN = 10.5  # 1,050 px: shown at full size in a 1,100 px column, so text keeps its size
PANEL_TITLE_PT = 10.0  # 13.9 px at full size; ≥ 10 px down to a 760 px wide column
PANEL_COLUMNS = 4


def _draw_points(ax, c: dict, reference, lim, colour) -> None:
    if reference is not None and not c.get("ref"):
        ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.8", lw=0)
    ax.scatter(c["data"][:, 0], c["data"][:, 1], s=1.5, color="k" if c.get("ref") else (colour or "C0"), lw=0)
    if lim is not None:
        ax.set_xlim(lim[0][0], lim[1][0])
        ax.set_ylim(lim[0][1], lim[1][1])
    ax.set_aspect("equal", adjustable="box")


@_plain_text
def sample_panels(cells: list[dict], path: Path, reference: Optional[np.ndarray] = None, title: str = "",
                  colour=None) -> None:
    """One panel per cell, ``PANEL_COLUMNS`` to a row: ``cells`` = [{"title", "kind" ("images"|"points"),
    "data", optional "note"}]; a note (e.g. why a panel looks empty) is written across its panel.

    Point panels share axes limits from the exact data (``reference``, grey behind the samples), so a diverged
    sampler cannot squash the picture; its samples are drawn in ``colour`` (the solver's chart colour).
    """
    plt = _plt()
    panels = ([{"title": "exact data", "kind": "points", "data": reference, "ref": True}] if reference is not None
              else []) + cells
    cols = min(len(panels), PANEL_COLUMNS)
    rows = int(math.ceil(len(panels) / cols))
    width = PANEL_FIGURE_WIDTH_IN * cols / PANEL_COLUMNS
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.85 * rows + (0.35 if title else 0)), dpi=PANEL_DPI,
                             squeeze=False)
    lim = None
    if reference is not None:
        lo, hi = np.percentile(reference, [0.5, 99.5], axis=0)
        pad = 0.25 * (hi - lo)
        lim = (lo - pad, hi + pad)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, panels):
        if c["kind"] == "images":
            ax.imshow(_mosaic(c["data"]), interpolation="nearest")
        else:
            _draw_points(ax, c, reference, lim, colour)
        if c.get("note"):
            ax.text(0.5, 0.5, c["note"], transform=ax.transAxes, ha="center", va="center", fontsize=PANEL_TITLE_PT,
                    color="#b00", bbox=dict(facecolor="white", alpha=0.85, edgecolor="#b00", lw=0.8))
        ax.set_title(c["title"], fontsize=PANEL_TITLE_PT)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=PANEL_TITLE_PT + 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
