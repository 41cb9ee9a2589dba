"""Build the report of a results directory: ``report.md`` (figures beside it) and a self-contained
``report.html`` (figures embedded as base64 PNG), from ``results.csv`` and the saved sample previews alone.

    python -m bench.report runs/gmm2d
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .charts import metric_chart, sample_panels
from .results import (METRIC_PREFIX, RESULTS_CSV, IncompatibleResultsError, atomic_write_text, load_results,
                      row_threads)

__all__ = ["build_report", "main", "PUBLISHED", "observations"]

# Published FIDs on CIFAR-10 (50,000 samples vs CIFAR-10 train, Inception-v3), for the side-by-side table.
# "match" selects the cells of a run that use the same sampler setting.
PUBLISHED = {
    "ddpm_cifar": [
        {"setting": "DDPM ancestral, 1000 steps (σ² = β, EMA weights)", "solver": "ddpm", "steps": 1000,
         "fid": 3.17, "source": "Ho et al. 2020, Table 1"},
        *({"setting": f"DDIM η = 0, quadratic, {s} steps", "solver": "ddim", "steps": s, "fid": v,
           "source": "Song et al. 2021 (DDIM), Table 1"}
          for s, v in ((10, 13.36), (20, 6.84), (50, 4.67), (100, 4.16), (1000, 4.04))),
    ],
}


# -- formatting ------------------------------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and abs(v) < 1e6:
            return f"{int(v):,}"
        return f"{v:.{digits}g}"
    return str(v)


class _Doc:
    """Blocks rendered both as Markdown and as HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def table(self, header: list[str], rows: list[list]):
        self.blocks.append(("table", header, [[_fmt(c) for c in r] for r in rows]))

    def img(self, rel: str, caption: str):
        self.blocks.append(("img", rel, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "code":
                out.append("```\n" + b[1] + "\n```")
            elif b[0] == "table":
                esc = [[c.replace("|", "\\|") for c in r] for r in [b[1]] + b[2]]
                lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
                lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, base: Path, title: str) -> str:
        def inline(text: str) -> str:
            # The Markdown subset used here: `code` and **bold**.
            t = html.escape(text)
            parts = t.split("`")
            t = "".join(f"<code>{s}</code>" if i % 2 else s for i, s in enumerate(parts))
            parts = t.split("**")
            return "".join(f"<b>{s}</b>" if i % 2 else s for i, s in enumerate(parts))

        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "code":
                body.append(f"<pre><code>{html.escape(b[1])}</code></pre>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode((base / b[1]).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45}table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
                 "img{max-width:100%}figcaption{font-size:0.85em;color:#555}pre{background:#f6f6f6;"
                 "padding:0.6em;overflow-x:auto}code{background:#f6f6f6}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _floor_pair(value) -> Optional[tuple[float, float]]:
    """A stored noise floor as (mean, sd): [mean, sd] lists, or a bare number (sd unknown → 0)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return float(value[0]), float(value[1]) if len(value) > 1 else 0.0
    return float(value), 0.0


# -- analysis -----------------------------------------------------------------------------------------------------
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
        lab = labels.get(k, k)
        floor = floors.get(k)
        for solver, g in d.groupby("solver_label", sort=False):
            g = g.sort_values("steps")
            vals, steps = g[col].to_numpy(float), g["steps"].to_numpy(int)
            worse = [(steps[i], vals[i], steps[i + 1], vals[i + 1]) for i in range(len(vals) - 1)
                     if vals[i + 1] > vals[i]]
            if len(vals) < 2:
                continue
            if not worse:
                out.append(f"{lab}, {solver}: improves (or holds) with every increase in steps "
                           f"({_fmt(vals[0])} at {steps[0]} → {_fmt(vals[-1])} at {steps[-1]}).")
            else:
                near = floor is not None and floor > 0 and all(max(a[1], a[3]) < 2 * floor for a in worse)
                txt = "; ".join(f"{_fmt(v0)} at {s0} → {_fmt(v1)} at {s1}" for s0, v0, s1, v1 in worse)
                out.append(f"{lab}, {solver}: NOT monotone in steps ({txt})"
                           + (" — all within 2× the noise floor, i.e. sampling noise of the metric"
                              if near else "") + ".")
        at10 = d[d["steps"] == 10]
        dpm = at10[at10["solver"].str.startswith("dpmpp")]
        ddim = at10[at10["solver"] == "ddim"]
        for _, a in dpm.iterrows():
            for _, b in ddim.iterrows():
                va, vb = float(a[col]), float(b[col])
                verdict = "better than" if va < vb else ("equal to" if va == vb else "WORSE than")
                out.append(f"{lab} at 10 steps: {a['solver_label']} {_fmt(va)} (NFE {_fmt(a['nfe'])}) is {verdict} "
                           f"{b['solver_label']} {_fmt(vb)} (NFE {_fmt(b['nfe'])}).")
        best = d.loc[d[col].astype(float).idxmin()]
        out.append(f"{lab}: best {_fmt(best[col])} by {best['solver_label']} at {int(best['steps'])} steps "
                   f"(NFE {_fmt(best['nfe'])}, {_fmt(best['time_total_s'], 3)} s)"
                   + (f"; noise floor {_fmt(floor)}" if floor is not None else "") + ".")
        tol = float(best[col]) * 1.1 if float(best[col]) > 0 else float(best[col])
        cheap = d[d[col].astype(float) <= tol].sort_values("time_total_s").iloc[0]
        if cheap["cell_key"] != best["cell_key"]:
            out.append(f"{lab}: the cheapest cell within 10% of the best is {cheap['solver_label']} at "
                       f"{int(cheap['steps'])} steps ({_fmt(cheap[col])}, {_fmt(cheap['time_total_s'], 3)} s).")
    return out


# -- the report ----------------------------------------------------------------------------------------------------
def _load_preview(out_dir: Path, name: str):
    path = out_dir / "previews" / f"{name}.npz"
    if not path.exists():
        return None, None
    with np.load(path, allow_pickle=False) as z:
        return z["data"], str(z["kind"])


def _setting(row, name: str, default: str) -> str:
    """A run setting of a results row; files written before the setting existed hold its default."""
    value = row.get(name, default)
    return value if isinstance(value, str) and value else default


def _timing_conditions(df: pd.DataFrame) -> tuple[list[int], list[int], list[str]]:
    """The distinct thread counts and batch sizes the cells were timed with, and the device names without the
    thread count that older files wrote into them."""
    threads = sorted({t for t in (row_threads(r) for r in df.to_dict("records")) if t is not None})
    batches = sorted({int(b) for b in df["batch_size"].dropna()})
    devices = list(dict.fromkeys(re.sub(r"\s*\(\d+ threads\)\s*$", "", str(v)) for v in df["device_name"]))
    return threads, batches, devices


def build_report(out_dir: Path, quiet: bool = False) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` in ``out_dir`` from its results.

    Returns:
        (path of report.md, path of report.html).

    Raises:
        FileNotFoundError: no results.csv in ``out_dir``.
        IncompatibleResultsError: results of another schema version.
    """
    out_dir = Path(out_dir)
    if not (out_dir / RESULTS_CSV).exists():
        raise FileNotFoundError(f"no {RESULTS_CSV} in {out_dir}: run `python -m bench.run --out {out_dir}` first")
    df = load_results(out_dir)
    if df.empty:
        raise FileNotFoundError(f"{out_dir / RESULTS_CSV} has no rows yet")
    ref_info = {}
    if (out_dir / "reference.json").exists():
        ref_info = json.loads((out_dir / "reference.json").read_text())
    df = df.sort_values(["solver_label", "steps"], kind="stable").reset_index(drop=True)
    keys = [c[len(METRIC_PREFIX):] for c in df.columns if c.startswith(METRIC_PREFIX)]
    labels = {}
    for s in df["metric_labels"].dropna():
        labels.update(json.loads(s))
    floor_pairs = {k: _floor_pair((ref_info.get("metrics", {}).get(k, {}) or {}).get("floor")) for k in keys}
    floors = {k: (v[0] if v else None) for k, v in floor_pairs.items()}
    notes = {k: (ref_info.get("metrics", {}).get(k, {}) or {}).get("note", "") for k in keys}
    model = str(df["model"].iloc[0])
    first = df.iloc[0]
    n = int(first["num_samples"])
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)

    doc = _Doc()
    doc.h(1, f"Sampler benchmark: {model}")
    ok = df[df["status"] == "ok"]
    threads, batches, devices = _timing_conditions(df)
    doc.p(f"{len(df)} cells ({len(ok)} ok, {len(df) - len(ok)} failed), {n:,} samples per cell, seed "
          f"{int(first['seed'])}, {first['dtype']} on {', '.join(devices)} "
          f"({', '.join(map(str, threads)) or 'unrecorded'} CPU threads; "
          f"batch {', '.join(map(str, batches))}; network call: "
          f"{_setting(first, 'network', 'eager')}; noise: {_setting(first, 'rng', 'torch')} generators) "
          f"({first['device']}{', ' + str(int(first['world_size'])) + ' processes' if int(first['world_size']) > 1 else ''})."
          " Every cell starts sample j from the same per-sample seed; timing excludes the warm-up batches and "
          "synchronises the device; NFE is the number of model calls the library counted per sample.")
    if len(threads) > 1 or len(batches) > 1:
        doc.p(f"**Timings are not comparable across all cells:** they were made under different conditions "
              f"(CPU threads: {', '.join(map(str, threads))}; batch sizes: {', '.join(map(str, batches))}; see "
              "the threads and batch_size columns of results.csv). Compare wall-clock only between cells made "
              "with the same values; bench.run no longer adds cells made under other values to one folder.")
    doc.p("Produced by:")
    doc.code("\n".join(dict.fromkeys(df["command"].dropna().astype(str))))

    card = ref_info.get("card", {})
    if card:
        doc.h(2, "Model")
        doc.bullets([f"**{card.get('name')}** ({card.get('kind')}): {card.get('description', '')}",
                     f"schedule: {card.get('schedule_name')}; prediction: {card.get('prediction')}; "
                     f"reference: {card.get('reference')}"]
                    + ([f"weights: {card.get('weights_note')}"] if card.get("weights_note") else [])
                    + ([f"notes: {card.get('notes')}"] if card.get("notes") else []))

    doc.h(2, "Metrics")
    doc.bullets([f"**{labels.get(k, k)}** (`{k}`): {notes.get(k, '')}"
                 + (f"; noise floor at n = {n:,}: **{_fmt(floor_pairs[k][0])} ± {_fmt(floor_pairs[k][1], 2)}**"
                    if floor_pairs.get(k) else "")
                 for k in keys]
                + (["Inception-free numbers (FD with other features, data-space distances) are not FIDs and are "
                    "not comparable with published FIDs."] if "fid" not in keys else []))

    doc.h(2, "Results")
    header = ["solver", "options", "steps", "spacing", "NFE", "time s", "model s", "solver s", "ms/sample"] + \
             [labels.get(k, k) for k in keys] + ["status"]
    rows = []
    for _, r in df.iterrows():
        changed = json.loads(r["solver_options_changed"]) if isinstance(r.get("solver_options_changed"), str) else {}
        opts = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
        rows.append([r["solver_label"], opts, int(r["steps"]), r["spacing"], r["nfe"], r["time_total_s"], r["time_model_s"],
                     r["time_solver_s"], r["time_per_sample_ms"]] + [r[METRIC_PREFIX + k] for k in keys]
                    + [r["status"]])
    doc.table(header, rows)
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        doc.h(3, "Failed cells")
        doc.bullets([f"{r['solver_label']} × {int(r['steps'])} steps: {r['error']}" for _, r in failed.iterrows()])
    spacing_notes = sorted({f"{r['solver_label']}: {r['spacing']} — {r['spacing_note']}" for _, r in df.iterrows()})
    doc.p("Time grids: " + "; ".join(spacing_notes) + ".")

    doc.h(2, "Charts")
    pareto_lines = []
    for k in keys:
        col = METRIC_PREFIX + k
        for x, tag, what in (("time_total_s", "time", "wall-clock"), ("nfe", "nfe", "NFE")):
            rel = f"figures/{k}_vs_{tag}.png"
            front = metric_chart(df, col, labels.get(k, k), x, out_dir / rel, floor=floor_pairs.get(k),
                                 title=f"{model}: {labels.get(k, k)} vs {what} (n = {n:,})")
            if front is None:
                continue
            doc.img(rel, f"{labels.get(k, k)} against {what}; one line per solver, step counts beside the points; "
                         "circled: the Pareto frontier")
            if tag == "time":
                pareto_lines.append(f"{labels.get(k, k)} vs wall-clock: " + ", ".join(
                    f"{df.loc[i, 'solver_label']}×{int(df.loc[i, 'steps'])} ({_fmt(df.loc[i, col])}, "
                    f"{_fmt(df.loc[i, 'time_total_s'], 3)} s)" for i in front))
    if pareto_lines:
        doc.h(3, "Pareto frontier (best quality for the time spent)")
        doc.bullets(pareto_lines)

    doc.h(2, "Observations")
    doc.p("Read off the table above by `bench.report` (no judgement added):")
    doc.bullets(observations(df, keys, labels, floors) or ["(no successful cells)"])

    published_key = {"ddpm_cifar_hub": "ddpm_cifar"}.get(model, model)  # same network, other weights
    if published_key in PUBLISHED:
        doc.h(2, "Published numbers, side by side")
        fid_here = "fid" in keys
        doc.p("Published: FID, 50,000 samples against CIFAR-10 train, Inception-v3. "
              + ("This run: FID with torch-fidelity's Inception-v3 against the card's reference, "
                 f"{n:,} samples{'' if n == 50000 else ' — FID is biased by the sample count, so only 50,000 is comparable'}."
                 if fid_here else "This run has no Inception FID, so nothing here is comparable with them."))
        prow = []
        for pub in PUBLISHED[published_key]:
            match = ok[(ok["solver"] == pub["solver"]) & (ok["steps"] == pub["steps"])]
            if pub["solver"] == "ddim":
                match = match[match["deterministic"].astype(str).str.lower() == "true"]
            here = [f"{_fmt(r[METRIC_PREFIX + 'fid'])} ({r['solver_label']}, {r['spacing']})" for _, r in match.iterrows()] \
                if fid_here else []
            prow.append([pub["setting"], pub["fid"], pub["source"], "; ".join(here) or "–"])
        doc.table(["setting", "published FID", "source", "this run (FID)"], prow)
        if card.get("weights_note"):
            doc.p(f"Weights: {card['weights_note']}")

    doc.h(2, "Samples")
    ref_points, _ = _load_preview(out_dir, "reference")
    for solver, g in df.groupby("solver_label", sort=False):
        panels = []
        for _, r in g.sort_values("steps").iterrows():
            data, kind = _load_preview(out_dir, r["cell_id"])
            if data is not None:
                panels.append({"title": f"{int(r['steps'])} steps (NFE {_fmt(r['nfe'])})", "kind": kind, "data": data})
        if not panels:
            continue
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(solver))
        rel = f"figures/samples_{safe}.png"
        sample_panels(panels, out_dir / rel, reference=ref_points if panels[0]["kind"] == "points" else None,
                      title=f"{model}: {solver}")
        doc.img(rel, f"{solver}: the first samples of each cell (the same seeds in every panel)"
                     + ("; grey: exact data" if panels[0]["kind"] == "points" else ""))

    doc.h(2, "Environment")
    env_cols = ["device_name", "device", "world_size", "hostname", "platform", "python", "torch", "cuda",
                "torch_fidelity", "numpy", "solvers_version", "bench_version", "git_commit", "git_dirty"]
    env_rows = []
    for c in env_cols:
        if c in df.columns:
            vals = list(dict.fromkeys(str(v) for v in df[c].tolist()))
            env_rows.append([c, ", ".join(vals)])
    doc.table(["", "value"], env_rows)
    doc.p(f"Cells ran from {df['started_at'].min()} to {df['finished_at'].max()} (UTC). Rebuild this report with "
          f"`python -m bench.report {out_dir}`.")

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, doc.markdown())
    atomic_write_text(html_path, doc.html(out_dir, f"Sampler benchmark: {model}"))
    if not quiet:
        print(f"bench.report: wrote {md_path} and {html_path}", file=sys.stderr)
    return md_path, html_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.report DIR``: rebuild the report of a results directory."""
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Rebuild OUT/report.md and OUT/report.html (charts embedded) from "
                                            "OUT/results.csv and the saved sample previews alone.")
    p.add_argument("out", help="a results directory written by python -m bench.run")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    try:
        build_report(Path(args.out), quiet=args.quiet)
    except (FileNotFoundError, IncompatibleResultsError) as e:
        print(f"bench.report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
