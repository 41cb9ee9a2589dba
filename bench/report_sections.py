"""The evidence sections of the report, one builder each: setup, model, metrics, results table, charts,
observations, published numbers, samples, environment. Each writes its blocks into a ``Doc`` from a
``ReportInput`` (the results table and what travels with it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .charts import metric_chart, sample_panels, usable_front
from .report_analysis import MetricVerdict, has_guidance, observations, timing_summary
from .report_doc import Doc, cell_name, fmt, fmt_time, fmt_timed, md_text, plural
from .results import (METRIC_PREFIX, RUN_SETTING_DEFAULTS, THREADS_SUFFIX, load_preview, row_threads, row_timing,
                      safe_filename)

__all__ = ["ReportInput", "published_fid_rows", "setup_section", "model_section", "metrics_section", "results_section",
           "charts_section", "observations_section", "published_section", "samples_section",
           "environment_section"]

def published_fid_rows(model: str) -> list[dict]:
    """The published FIDs of ``model``'s card (:meth:`pretrained.cards.ModelCard.published_fid_rows`); none for
    a model that is not in the zoo (a results folder of a model registered elsewhere)."""
    import pretrained
    try:
        card = pretrained.get_card(model)
    except ValueError:
        return []
    return card.published_fid_rows()


@dataclass
class ReportInput:
    """The results table (sorted by solver and steps) and what the report reads beside it."""
    out_dir: Path
    df: pd.DataFrame
    keys: list[str]
    labels: dict
    floor_pairs: dict
    notes: dict
    card: dict
    colours: dict
    verdicts: list[MetricVerdict] = field(default_factory=list)

    @property
    def ok(self) -> pd.DataFrame:
        return self.df[self.df["status"] == "ok"]

    @property
    def model(self) -> str:
        return str(self.df["model"].iloc[0])

    @property
    def n(self) -> int:
        return int(self.df["num_samples"].iloc[0])

    @property
    def off_scale(self) -> set:
        return {i for v in self.verdicts for i in v.off_scale}

    def load_preview(self, name: str):
        """(data, kind) of a saved preview, or (None, None)."""
        return load_preview(self.out_dir, name)


def _setting(row, name: str) -> str:
    """A run setting of a results row; files written before the setting existed hold its default."""
    default = RUN_SETTING_DEFAULTS[name]
    value = row.get(name, default)
    return value if isinstance(value, str) and value else default


def _timing_conditions(df: pd.DataFrame) -> tuple[list[int], list[int], list[str]]:
    """The distinct thread counts and batch sizes the cells were timed with, and the device names without the
    thread count that older files wrote into them."""
    threads = sorted({t for t in (row_threads(r) for r in df.to_dict("records")) if t is not None})
    batches = sorted({int(b) for b in df["batch_size"].dropna()})
    devices = list(dict.fromkeys(THREADS_SUFFIX.sub("", str(v)) for v in df["device_name"]))
    return threads, batches, devices


def setup_section(doc: Doc, ri: ReportInput) -> None:
    """How the cells were made: counts, seeds, dtype, device, threads, batch, and the producing commands."""
    df, first = ri.df, ri.df.iloc[0]
    threads, batches, devices = _timing_conditions(df)
    world = int(first["world_size"])
    doc.h(2, "Setup")
    doc.p(f"{plural(len(df), 'cell')} ({len(ri.ok)} ok, {len(df) - len(ri.ok)} failed), "
          f"{plural(ri.n, 'sample')} per cell, seed {int(first['seed'])}, {first['dtype']} on {', '.join(devices)} "
          f"({', '.join(map(str, threads)) or 'unrecorded'} CPU threads; "
          f"batch {', '.join(map(str, batches))}; network call: "
          f"{_setting(first, 'network')}; noise: {_setting(first, 'rng')} generators) "
          f"({first['device']}{', ' + plural(world, 'process', 'processes') if world > 1 else ''})."
          " Every cell starts sample j from the same per-sample seed; timing excludes the warm-up batches and "
          "synchronises the device; NFE is the number of model calls the library counted per sample.")
    if len(threads) > 1 or len(batches) > 1:
        doc.p(f"**Timings are not comparable across all cells:** they were made under different conditions "
              f"(CPU threads: {', '.join(map(str, threads))}; batch sizes: {', '.join(map(str, batches))}; see "
              "the threads and batch_size columns of results.csv). Compare wall-clock only between cells made "
              "with the same values; bench.run no longer adds cells made under other values to one folder.")
    decode = _decode_seconds(df)
    if decode is not None:
        decoder = md_text(ri.card.get("decoder_name") or "the card's decoder")
        doc.p(f"**Latent model:** the samples are latents decoded by {decoder}; each cell's time includes the "
              f"decoding, timed apart in the *decode s* column (median {fmt_time(float(decode.median()))} s per "
              "cell); sampling alone is model s + solver s.")
    if has_guidance(df):
        classes = ri.card.get("num_classes") or "C"
        scales = ", ".join(f"{w:g}" for w in sorted(pd.to_numeric(df["guidance"], errors="coerce").dropna().unique()))
        doc.p(f"**Classifier-free guidance:** every cell is sampled at one guidance scale w ({scales}): the network "
              "output is out_u + w·(out_c − out_u) (w = 1: the conditional model alone, 0: the unconditional one). "
              f"**Labels:** sample i (the same index that chooses its seed) is generated for class i mod {classes} — "
              "balanced, and the same whatever the batch size or the number of processes. NFE counts model calls "
              "per sample; *rows* counts the network batch rows per sample, twice the NFE at w ∉ {0, 1} (the "
              "conditional and unconditional branches run in one batch); the times are measured either way.")
    doc.p("Produced by:")
    doc.code("\n".join(dict.fromkeys(df["command"].dropna().astype(str))))


def _decode_seconds(df: pd.DataFrame) -> Optional[pd.Series]:
    """The decoding times of the ok cells of a latent model (None when the cells decoded nothing)."""
    if "time_decode_s" not in df:
        return None
    d = pd.to_numeric(df.loc[df["status"] == "ok", "time_decode_s"], errors="coerce").dropna()
    return d if len(d) and float(d.max()) > 0 else None


def model_section(doc: Doc, ri: ReportInput) -> None:
    """The model card, when the results folder has one (its text escaped: a card's text is the user's)."""
    if not ri.card:
        return
    card = {k: md_text(v) if isinstance(v, str) else v for k, v in ri.card.items()}
    doc.h(2, "Model")
    doc.bullets([f"**{card.get('name')}** ({card.get('kind')}): {card.get('description', '')}",
                 f"schedule: {card.get('schedule_name')}; prediction: {card.get('prediction')}; "
                 f"reference: {card.get('reference')}"]
                + ([f"weights: {card.get('weights_note')}"] if card.get("weights_note") else [])
                + ([f"notes: {card.get('notes')}"] if card.get("notes") else []))


def metrics_section(doc: Doc, ri: ReportInput) -> None:
    """What each metric measures and its noise floor."""
    doc.h(2, "Metrics")
    fp = ri.floor_pairs
    doc.bullets([f"**{ri.labels.get(k, k)}** (`{k}`): {ri.notes.get(k, '')}"
                 + (f"; noise floor at n = {ri.n:,}: **{fmt(fp[k][0])} ± {fmt(fp[k][1], 2)}**" if fp.get(k) else "")
                 for k in ri.keys]
                + (["Inception-free numbers (FD with other features, data-space distances) are not FIDs and are "
                    "not comparable with published FIDs."] if "fid" not in ri.keys else []))


def results_section(doc: Doc, ri: ReportInput) -> None:
    """Every cell as a table row (wall-clock to 3 significant digits), failed cells, the time grids."""
    df, keys = ri.df, ri.keys
    doc.h(2, "Results")
    decoded = _decode_seconds(df) is not None
    guided = has_guidance(df)
    header = ["solver", "options", "steps"] + (["guidance"] if guided else []) + ["spacing", "NFE"] \
        + (["rows"] if guided else []) + ["time s", "passes", "model s", "solver s"] \
        + (["decode s"] if decoded else []) + ["ms/sample"] + [ri.labels.get(k, k) for k in keys] + ["status"]
    rows, off = [], ri.off_scale
    for i, r in df.iterrows():
        changed = json.loads(r["solver_options_changed"]) if isinstance(r.get("solver_options_changed"), str) else {}
        opts = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
        columns = ("time_model_s", "time_solver_s") + (("time_decode_s",) if decoded else ()) + ("time_per_sample_ms",)
        times = [fmt_timed(r), row_timing(r)[3]] + [fmt_time(r[c]) for c in columns]
        guidance = [r["guidance"]] if guided else []
        net_rows = [r.get("network_rows", float("nan"))] if guided else []
        rows.append([r["solver_label"], opts, int(r["steps"]), *guidance, r["spacing"], r["nfe"], *net_rows, *times]
                    + [r[METRIC_PREFIX + k] for k in keys] + [r["status"] + (" (diverged)" if i in off else "")])
    how, unstable = timing_summary(df)
    doc.p(how)
    if unstable:
        doc.p(unstable)
    doc.table(header, rows)
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        doc.h(3, "Failed cells")
        doc.bullets([f"{cell_name(r)}: {r['error']}" for _, r in failed.iterrows()])
    spacing_notes = sorted({f"{r['solver_label']}: {r['spacing']} — {r['spacing_note']}" for _, r in df.iterrows()})
    doc.p("Time grids: " + "; ".join(spacing_notes) + ".")
    _optimized_grids(doc, df)


def _optimized_grids(doc: Doc, df: pd.DataFrame) -> None:
    """The optimised cells' grids beside the default grids they started from, with the calibration errors."""
    rows = []
    for _, r in df.iterrows():
        cal = json.loads(r["grid_calibration"]) if isinstance(r.get("grid_calibration"), str) else {}
        if not cal or "optimized" not in cal:
            continue
        grids = [", ".join(fmt(float(t), 3) for t in cal[k]) for k in ("default", "optimized")]
        rows.append([r["solver_label"], int(r["steps"]), f"{cal['from']}: {grids[0]}", grids[1],
                     f"{fmt(cal['error_before'], 3)} → {fmt(cal['error_after'], 3)}", f"{int(cal['nfe']):,}"])
    if not rows:
        return
    first = json.loads(df.loc[df["grid_calibration"].astype(str).str.contains("optimized"), "grid_calibration"].iloc[0])
    doc.h(3, "Optimized grids")
    doc.p(f"Each optimized cell's grid was found by `solvers.optimize_timesteps` on {first['calibration_samples']} "
          f"calibration samples (seeds {first['calibration_seeds']}, disjoint from the evaluated samples), so "
          "the metrics above are measured on held-out samples. Calibration error: RMS against an accurate "
          "reference of the calibration batch, on the default grid → on the optimized one; cost: the model "
          "calls the calibration spent (batched).")
    doc.table(["solver", "steps", "default grid", "optimized grid", "calibration error", "cost (calls)"], rows)


def _guidance_parts(df: pd.DataFrame) -> list[tuple[Optional[float], pd.DataFrame]]:
    """[(None, df)] for an unconditional sweep; one (w, its cells) per guidance scale of a guided one."""
    if not has_guidance(df):
        return [(None, df)]
    return [(float(w), g) for w, g in df.groupby("guidance", sort=True)]


def charts_section(doc: Doc, ri: ReportInput) -> dict:
    """Each metric against wall-clock and NFE — one chart per guidance scale in a guided sweep (each scale
    samples its own distribution). Returns {(metric key, x column): usable Pareto row labels over all cells}."""
    doc.h(2, "Charts")
    fronts = {}
    for v in ri.verdicts:
        for x, tag, what in (("time_total_s", "time", "wall-clock"), ("nfe", "nfe", "NFE")):
            for w, part in _guidance_parts(ri.df):
                suffix, at = ("", "") if w is None else (f"_w{safe_filename(f'{w:g}')}", f", guidance w = {w:g}")
                rel = f"figures/{v.key}_vs_{tag}{suffix}.png"
                front = metric_chart(part, v.column, v.label, x, ri.out_dir / rel, floor=v.floor,
                                     title=f"{ri.model}: {v.label} vs {what}{at} (n = {ri.n:,})", colours=ri.colours,
                                     off_scale=v.off_scale, usable_max=v.bound, higher_is_better=v.higher)
                if front is None:
                    continue
                off = ", ".join(f"{ri.df.loc[i, 'solver_label']} × {int(ri.df.loc[i, 'steps'])}"
                                for i in v.off_scale if i in part.index)
                doc.img(rel, f"{v.label} against {what}{at}; one colour per solver (the same in every chart), step "
                             "counts beside the points; circled: the Pareto frontier among usable cells ("
                             f"{'above' if v.higher else 'below'} the dash-dot limit)"
                             + ("; horizontal bars: each cell's fastest to slowest timed pass"
                                if x == "time_total_s" else "")
                             + (f"; ▲ at the top edge: diverged, off-scale ({off})" if off else ""))
            if any(ri.df["status"] == "ok"):
                fronts[(v.key, x)] = usable_front(ri.df, v.column, x, v.off_scale, v.bound, v.higher)
    return fronts


def observations_section(doc: Doc, ri: ReportInput) -> None:
    """Plain statements read off the table."""
    floors = {k: (v[0] if v else None) for k, v in ri.floor_pairs.items()}
    doc.h(2, "Observations")
    doc.p("Read off the table above by `bench.report` (no judgement added):")
    doc.bullets(observations(ri.df, ri.keys, ri.labels, floors) or ["(no successful cells)"])


def published_section(doc: Doc, ri: ReportInput) -> None:
    """Published FIDs beside this run's cells of the same setting, for the models that have them."""
    published = published_fid_rows(ri.model)
    if not published:
        return
    n, ok, fid_here = ri.n, ri.ok, "fid" in ri.keys
    doc.h(2, "Published numbers, side by side")
    doc.p("Published: FID, 50,000 samples against CIFAR-10 train, Inception-v3. "
          + ("This run: FID with torch-fidelity's Inception-v3 against the card's reference, "
             f"{n:,} samples{'' if n == 50000 else ' — FID is biased by the sample count, so only 50,000 is comparable'}."
             if fid_here else "This run has no Inception FID, so nothing here is comparable with them."))
    prow = []
    for pub in published:
        match = ok[(ok["solver"] == pub["solver"]) & (ok["steps"] == pub["steps"])]
        if pub["deterministic"] is not None:
            match = match[match["deterministic"].astype(str).str.lower() == str(pub["deterministic"]).lower()]
        here = [f"{fmt(r[METRIC_PREFIX + 'fid'])} ({r['solver_label']}, {r['spacing']})" for _, r in match.iterrows()] \
            if fid_here else []
        prow.append([pub["setting"], pub["fid"], pub["source"], "; ".join(here) or "–"])
    doc.table(["setting", "published FID", "source", "this run (FID)"], prow)
    if ri.card.get("weights_note"):
        doc.p(f"Weights: {md_text(ri.card['weights_note'])}")


def _panel(ri: ReportInput, i, r, ref_max: Optional[float]) -> Optional[dict]:
    data, kind = ri.load_preview(r["cell_id"])
    if data is None:
        return None
    w = pd.to_numeric(pd.Series([r.get("guidance")]), errors="coerce").iloc[0]
    at = "" if not np.isfinite(w) else f", w = {float(w):g}"
    panel = {"title": f"{plural(int(r['steps']), 'step')}{at} (NFE {fmt(r['nfe'])})", "kind": kind, "data": data}
    if i in ri.off_scale:
        far = float(np.abs(data).max()) if kind == "points" else None
        panel["note"] = "diverged" + (f":\nsamples off-panel\n(|x| up to {fmt(far, 3)})"
                                      if far is not None and ref_max is not None and far > 2 * ref_max else "")
    return panel


def samples_section(doc: Doc, ri: ReportInput) -> None:
    """One figure per solver: the first samples of every cell, diverged panels labelled."""
    doc.h(2, "Samples")
    ref_points, _ = ri.load_preview("reference")
    ref_max = float(np.abs(ref_points).max()) if ref_points is not None else None
    for solver, g in ri.df.groupby("solver_label", sort=False):
        order = ["guidance", "steps"] if has_guidance(g) else ["steps"]
        panels = [p for p in (_panel(ri, i, r, ref_max) for i, r in g.sort_values(order).iterrows()) if p]
        if not panels:
            continue
        safe = safe_filename(str(solver))
        rel = f"figures/samples_{safe}.png"
        points = panels[0]["kind"] == "points"
        sample_panels(panels, ri.out_dir / rel, reference=ref_points if points else None,
                      title=f"{ri.model}: {solver}", colour=ri.colours.get(str(solver)))
        doc.img(rel, f"{solver}: the first samples of each cell (the same seeds in every panel"
                     + ("; sample i is of class i mod the number of classes" if has_guidance(g) else "") + ")"
                     + ("; grey: exact data" if points else ""))


def environment_section(doc: Doc, ri: ReportInput) -> None:
    """Software and machine of the cells, and when they ran."""
    df = ri.df
    doc.h(2, "Environment")
    env_cols = ["device_name", "device", "world_size", "hostname", "platform", "python", "torch", "cuda",
                "torch_fidelity", "numpy", "solvers_version", "bench_version", "git_commit", "git_dirty"]
    env_rows = [[c, ", ".join(dict.fromkeys(str(v) for v in df[c].tolist()))] for c in env_cols if c in df.columns]
    doc.table(["", "value"], env_rows)
    doc.p(f"Cells ran from {df['started_at'].min()} to {df['finished_at'].max()} (UTC). Rebuild this report with "
          f"`python -m bench.report {ri.out_dir}`.")
