"""Build the report of a results directory: ``report.md`` (figures beside it) and a self-contained
``report.html`` (figures embedded as base64 PNG), from what ``bench.results`` stores in the folder alone:
``results.csv``, the reference data (noise floors and the model card) and the saved sample previews.

The report answers first ("Recommendation": the best cell per budget, the usable Pareto set, the diverged
cells and why), then gives the evidence (setup, model, metrics, results, charts, observations, samples,
environment): ``report_answer`` and ``report_sections`` hold the section builders, ``report_analysis`` the
rules they apply, ``report_doc`` the formatting.

    python -m bench.report runs/gmm2d
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .charts import solver_colours
from .report_analysis import has_guidance, judge_metric, observations
from .report_answer import point_magnitude, recommendation_section
from .report_doc import Doc, fmt, md_text
from .report_sections import (ReportInput, charts_section, environment_section, metrics_section,
                              model_section, observations_section, published_section, results_section,
                              samples_section, setup_section)
from .results import (METRIC_PREFIX, RESULTS_CSV, IncompatibleResultsError, atomic_write_text, load_reference_info,
                      load_results, metric_columns)

__all__ = ["build_report", "main", "observations"]

_fmt = fmt  # the table format, as the tests compare it


def _floor_pair(value) -> Optional[tuple[float, float]]:
    """A stored noise floor as (mean, sd): [mean, sd] lists, or a bare number (sd unknown → 0)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return float(value[0]), float(value[1]) if len(value) > 1 else 0.0
    return float(value), 0.0


def _read_input(out_dir: Path) -> ReportInput:
    """The results table and reference data of ``out_dir``, with each metric's verdict."""
    if not (out_dir / RESULTS_CSV).exists():
        raise FileNotFoundError(f"no {RESULTS_CSV} in {out_dir}: run `python -m bench.run --out {out_dir}` first")
    df = load_results(out_dir)
    if df.empty:
        raise FileNotFoundError(f"{out_dir / RESULTS_CSV} has no rows yet")
    ref_info = load_reference_info(out_dir)
    order = ["guidance", "solver_label", "steps"] if has_guidance(df) else ["solver_label", "steps"]
    df = df.sort_values(order, kind="stable").reset_index(drop=True)
    keys = [c[len(METRIC_PREFIX):] for c in metric_columns(df)]
    labels = {}
    for s in df["metric_labels"].dropna():
        labels.update(json.loads(s))
    stored = {k: ref_info.get("metrics", {}).get(k, {}) or {} for k in keys}
    ri = ReportInput(out_dir=out_dir, df=df, keys=keys, labels=labels,
                     floor_pairs={k: _floor_pair(stored[k].get("floor")) for k in keys},
                     notes={k: stored[k].get("note", "") for k in keys}, card=ref_info.get("card", {}),
                     colours=solver_colours(df["solver_label"]))
    ri.verdicts = [v for v in (judge_metric(df, k, labels.get(k, k), ri.floor_pairs[k]) for k in keys) if v]
    return ri


def build_report(out_dir: Path, quiet: bool = False) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` in ``out_dir`` from its results.

    Returns:
        (path of report.md, path of report.html).

    Raises:
        FileNotFoundError: no results.csv in ``out_dir``.
        IncompatibleResultsError: results of another schema version.
    """
    out_dir = Path(out_dir)
    ri = _read_input(out_dir)
    (out_dir / "figures").mkdir(exist_ok=True)
    charts = Doc()
    fronts = charts_section(charts, ri)  # drawn first: the recommendation names their Pareto sets

    doc = Doc()
    title = f"Sampler benchmark: {ri.model}"
    doc.h(1, f"Sampler benchmark: {md_text(ri.model)}")
    ref_points, _ = ri.load_preview("reference")
    recommendation_section(doc, ri.verdicts, fronts, ri.df, ri.n,
                           point_magnitude(ref_points, ri.load_preview))
    for section in (setup_section, model_section, metrics_section, results_section):
        section(doc, ri)
    doc.blocks += charts.blocks
    for section in (observations_section, published_section, samples_section, environment_section):
        section(doc, ri)

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, doc.markdown())
    atomic_write_text(html_path, doc.html(out_dir, title))
    if not quiet:
        print(f"bench.report: wrote {md_path} and {html_path}", file=sys.stderr)
    return md_path, html_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.report DIR``: rebuild the report of a results directory."""
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Rebuild OUT/report.md and OUT/report.html (charts embedded) from "
                                            "OUT/results.csv, OUT/reference.json (noise floors, the card) and the saved "
                                            "sample previews alone.")
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
