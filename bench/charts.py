"""Charts of a results table (matplotlib, Agg): quality against wall-clock and against NFE with the Pareto
frontier marked, and the samples of every cell (an image grid, or a scatter for point models)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

__all__ = ["pareto_front", "metric_chart", "sample_panels"]


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


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def metric_chart(df: pd.DataFrame, column: str, label: str, x: str, path: Path,
                 floor: Optional[tuple[float, float]] = None, title: str = "") -> Optional[list[int]]:
    """Plot ``column`` against ``x`` (``time_total_s`` or ``nfe``, log scale), one line per solver entry.

    ``floor`` = (mean, sd) of the metric on reference data: drawn as a dotted line with a band.

    Returns:
        The row positions (in ``df``) of the Pareto-optimal cells, or None when there is nothing to plot.
    """
    plt = _plt()
    d = df[(df["status"] == "ok") & np.isfinite(df[column].astype(float))].copy()
    if d.empty:
        return None
    d = d[np.isfinite(d[x].astype(float)) & (d[x].astype(float) > 0)]
    if d.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    for lab, g in d.groupby("solver_label", sort=False):
        g = g.sort_values(x)
        ax.plot(g[x], g[column], marker="o", ms=4, lw=1.4, label=lab)
        for _, r in g.iterrows():
            ax.annotate(str(int(r["steps"])), (r[x], r[column]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color="0.35")
    xs, ys = d[x].to_numpy(float), d[column].to_numpy(float)
    front = pareto_front(xs, ys)
    if len(front):
        ax.step(xs[front], ys[front], where="post", color="k", lw=0.8, ls="--", alpha=0.7)
        ax.scatter(xs[front], ys[front], s=90, facecolors="none", edgecolors="k", lw=1.1,
                   label="Pareto frontier", zorder=5)
    if floor is not None and np.isfinite(floor[0]) and floor[0] > 0:
        mean, sd = floor
        ax.axhline(mean, color="0.5", ls=":", lw=1.0, label="noise floor (reference data, mean ± sd)")
        if sd > 0:
            ax.axhspan(max(mean - sd, mean * 0.05), mean + sd, color="0.5", alpha=0.12, lw=0)
    ax.set_xscale("log")
    positive = ys[np.isfinite(ys)]
    if len(positive) and (positive > 0).all() and positive.max() / positive.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel({"time_total_s": "wall-clock per cell, s (log; warm-up excluded)",
                   "nfe": "NFE: model evaluations per sample (log)"}.get(x, x))
    ax.set_ylabel(f"{label} (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [int(d.index[i]) for i in front]


def _mosaic(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """uint8 (N, 3, H, W) → one (rows·H, cols·W, 3) image with 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i].transpose(1, 2, 0)
    return out


def sample_panels(cells: list[dict], path: Path, reference: Optional[np.ndarray] = None, title: str = "") -> None:
    """One panel per cell: ``cells`` = [{"title", "kind" ("images"|"points"), "data"}], in one row.

    Point panels share axes limits and show the exact data (``reference``) in grey behind the samples.
    """
    plt = _plt()
    n = len(cells) + (1 if reference is not None else 0)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), dpi=100, squeeze=False)
    axes = axes[0]
    pts = [c["data"] for c in cells if c["kind"] == "points"] + ([reference] if reference is not None else [])
    lim = None
    if pts and reference is not None:
        # Limits from the exact data (a diverged sampler must not squash the picture).
        lo, hi = np.percentile(reference, [0.5, 99.5], axis=0)
        pad = 0.25 * (hi - lo)
        lim = (lo - pad, hi + pad)
    panels = ([{"title": "exact data", "kind": "points", "data": reference, "ref": True}] if reference is not None
              else []) + cells
    for ax, c in zip(axes, panels):
        if c["kind"] == "images":
            ax.imshow(_mosaic(c["data"]), interpolation="nearest")
        else:
            if reference is not None and not c.get("ref"):
                ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.8", lw=0)
            ax.scatter(c["data"][:, 0], c["data"][:, 1], s=1.5, c="k" if c.get("ref") else "C0", lw=0)
            if lim is not None:
                ax.set_xlim(lim[0][0], lim[1][0])
                ax.set_ylim(lim[0][1], lim[1][1])
            ax.set_aspect("equal", adjustable="box")
        ax.set_title(c["title"], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
