"""Timing a reader can trust: each cell's timed pass repeated (the rule of --repeats auto, --repeats N), the
medians and spread recorded per cell, old results files read as one pass, and the samples and metrics
unchanged by the repeats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import solvers
from bench import sweep, run as run_mod
from bench.report_doc import fmt_spread, fmt_timed
from bench.results import relative_spread, row_timing, timing_columns

SMALL = ["--model", "gmm2d", "--num-samples", "200", "--batch-size", "80", "--solvers", "ddim,heun",
         "--steps", "2,20"]
NEW_COLUMNS = ["time_repeats", "time_total_min_s", "time_total_max_s", "time_passes_s"]


def bench(out: Path, *args: str) -> int:
    return run_mod.main(["--quiet", "--out", str(out), *args])


# -- the rule ------------------------------------------------------------------------------------------------
def test_an_asked_number_of_repeats_is_exactly_that_many_passes():
    assert sweep.more_passes([5.0], 3) and sweep.more_passes([5.0, 5.0], 3)
    assert not sweep.more_passes([5.0, 5.0, 5.0], 3)
    assert not sweep.more_passes([0.001], 1)


def test_auto_repeats_cheap_cells_up_to_the_cap():
    cap = sweep.REPEAT_CAP
    for n in range(1, cap):
        assert sweep.more_passes([0.01] * n, None), n
    assert not sweep.more_passes([0.01] * cap, None)


def test_auto_repeats_only_while_the_extra_passes_fit_the_budget():
    budget = sweep.REPEAT_BUDGET_S + sweep.REPEAT_SHARE * 0.5  # a first pass of 0.5 s: 0.6 s of extra time
    assert budget == pytest.approx(0.6)
    assert sweep.more_passes([0.5], None)                # one extra pass of ~0.5 s fits
    assert not sweep.more_passes([0.5, 0.5], None)       # a second would make 1.0 s
    assert not sweep.more_passes([1.0], None)            # one extra 1 s pass > 0.5 + 0.2 s
    # the next pass is estimated by the median so far, not by one slow pass
    assert sweep.more_passes([0.1, 0.1, 0.1, 0.1], None)      # 0.3 + 0.1 ≤ 0.52
    assert not sweep.more_passes([0.1, 0.3, 0.3, 0.1], None)  # 0.7 + 0.2 > 0.52


@pytest.mark.parametrize("text", ["0", "-2", "three", "1.5"])
def test_a_bad_repeat_count_is_refused_before_any_work(tmp_path, capsys, text):
    assert bench(tmp_path / "out", "--repeats", text, *SMALL) == 2
    err = capsys.readouterr().err
    assert "--repeats must be a positive number of timed passes per cell or 'auto'" in err and repr(text) in err
    assert not (tmp_path / "out").exists()


# -- the row -----------------------------------------------------------------------------------------------------
def test_the_timing_columns_are_medians_with_the_fastest_and_slowest_pass():
    # the model and solver time of the median pass (not medians of their own), so that they add up to it
    cols = timing_columns([(0.3, 0.1, 0.2), (0.1, 0.05, 0.05), (0.2, 0.15, 0.05)])
    assert cols["time_total_s"] == pytest.approx(0.2)
    assert cols["time_model_s"] == pytest.approx(0.15)
    assert cols["time_solver_s"] == pytest.approx(0.05)
    assert (cols["time_repeats"], cols["time_total_min_s"], cols["time_total_max_s"]) == (3, 0.1, 0.3)
    assert json.loads(cols["time_passes_s"]) == pytest.approx([0.3, 0.1, 0.2])
    even = timing_columns([(0.3, 0.1, 0.2), (0.1, 0.1, 0.0), (0.9, 0.5, 0.4), (0.2, 0.2, 0.0)])
    assert (even["time_total_s"], even["time_model_s"], even["time_solver_s"]) == pytest.approx((0.25, 0.15, 0.1))
    with pytest.raises(ValueError, match="at least one pass"):
        timing_columns([])


def test_a_row_from_before_the_repeats_reads_as_one_pass():
    assert row_timing({"time_total_s": 0.25}) == (0.25, 0.25, 0.25, 1)
    assert row_timing({"time_total_s": 0.25, "time_repeats": float("nan"), "time_total_min_s": float("nan"),
                       "time_total_max_s": float("nan")}) == (0.25, 0.25, 0.25, 1)
    assert row_timing({"time_total_s": 0.2, "time_repeats": 3.0, "time_total_min_s": 0.1,
                       "time_total_max_s": 0.3}) == (0.2, 0.1, 0.3, 3)


def test_the_spread_is_half_the_range_relative_to_the_median():
    assert relative_spread(0.2, 0.1, 0.3) == pytest.approx(0.5)
    assert relative_spread(0.2, 0.2, 0.2) == 0.0
    assert np.isnan(relative_spread(0.0, 0.0, 0.0))
    assert fmt_spread(0.0392) == "±3.9 %" and fmt_spread(0.12) == "±12 %" and fmt_spread(float("nan")) == ""
    assert fmt_spread(1.82) == "±180 %" and fmt_spread(12.345) == "±1,200 %"  # 2 significant digits throughout
    row = {"time_total_s": 0.153, "time_repeats": 5, "time_total_min_s": 0.147, "time_total_max_s": 0.159}
    assert fmt_timed(row) == "0.153 ±3.9 %" and fmt_timed(row, " s") == "0.153 s ±3.9 %"
    assert fmt_timed({"time_total_s": 0.153}) == "0.153"


# -- the sweep ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """The same small sweep with one timed pass and with three, the sampling calls of each counted."""
    root = tmp_path_factory.mktemp("timing")
    calls = {}
    real = solvers.sample
    with pytest.MonkeyPatch.context() as mp:
        for repeats in ("1", "3"):
            seen = calls.setdefault(repeats, [])

            def counting(model, x, *, steps, _seen=seen, **kw):
                _seen.append((steps, x.shape[0]))
                return real(model, x, steps=steps, **kw)

            mp.setattr(solvers, "sample", counting)
            assert bench(root / repeats, "--repeats", repeats, *SMALL) == 0
    return root, calls


def test_repeated_passes_re_run_only_the_timed_sampling(twice):
    _, calls = twice
    # 200 samples in batches of 80: 3 timed batches per pass; warm-up once per batch shape (80, 40) at
    # min(steps, 3) steps whatever the repeats; two solvers (ddim, heun) at 20 steps
    for repeats, passes in (("1", 1), ("3", 3)):
        assert sorted(c for c in calls[repeats] if c[0] == 20) == sorted([(20, 80), (20, 80), (20, 40)] * passes * 2)
        assert sorted(c for c in calls[repeats] if c[0] == 3) == sorted([(3, 80), (3, 40)] * 2)


def test_repeats_change_neither_the_samples_nor_the_metrics(twice):
    root, _ = twice
    one, three = (pd.read_csv(root / r / "results.csv").set_index("cell_key") for r in ("1", "3"))
    assert sorted(one.index) == sorted(three.index)
    for col in [c for c in one.columns if c.startswith("metric.")] + ["nfe"]:
        np.testing.assert_allclose(three.loc[one.index, col], one[col], rtol=1e-12, err_msg=col)
    for cell_id in one["cell_id"]:
        with np.load(root / "1" / "previews" / f"{cell_id}.npz") as a, \
                np.load(root / "3" / "previews" / f"{cell_id}.npz") as b:
            np.testing.assert_allclose(b["data"], a["data"], rtol=1e-12)


def test_each_row_records_the_median_spread_and_count_of_its_passes(twice):
    root, _ = twice
    for repeats in (1, 3):
        df = pd.read_csv(root / str(repeats) / "results.csv")
        assert (df["time_repeats"] == repeats).all()
        for _, r in df.iterrows():
            passes = json.loads(r["time_passes_s"])
            assert len(passes) == repeats and all(p > 0 for p in passes)
            assert r["time_total_s"] == pytest.approx(float(np.median(passes)), rel=1e-6)
            assert (r["time_total_min_s"], r["time_total_max_s"]) == pytest.approx((min(passes), max(passes)),
                                                                                   rel=1e-6)
            assert r["time_per_sample_ms"] == pytest.approx(1000 * r["time_total_s"] / 200)
            assert r["time_model_s"] + r["time_solver_s"] == pytest.approx(r["time_total_s"], rel=1e-9)


def test_by_default_each_cell_is_repeated_by_the_rule(tmp_path):
    assert bench(tmp_path / "auto", "--steps", "1,2", *SMALL[:-2]) == 0
    df = pd.read_csv(tmp_path / "auto" / "results.csv")
    for _, r in df.iterrows():
        passes = json.loads(r["time_passes_s"])
        # every pass after the first was asked for by the rule, and the rule stopped at the last one
        assert all(sweep.more_passes(passes[:k], None) for k in range(1, len(passes)))
        assert not sweep.more_passes(passes, None)
        # 200 two-dimensional samples in 1 or 2 steps take milliseconds (at most ~0.15 s on a busy machine):
        # far inside the 0.5 s budget, so each cell is repeated
        assert 2 <= r["time_repeats"] == len(passes) <= sweep.REPEAT_CAP


def test_a_results_file_from_before_the_repeats_is_extended_and_reported(twice, tmp_path):
    root, _ = twice
    out = tmp_path / "old"
    out.mkdir()
    old = pd.read_csv(root / "1" / "results.csv").drop(columns=NEW_COLUMNS)
    old = old[old["steps"] == 2]
    old.to_csv(out / "results.csv", index=False)
    assert bench(out, "--repeats", "2", *SMALL) == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4
    was_old = df["steps"] == 2
    assert df.loc[was_old, "time_repeats"].isna().all() and (df.loc[~was_old, "time_repeats"] == 2).all()
    assert all(row_timing(r)[3] == (1 if r["steps"] == 2 else 2) for r in df.to_dict("records"))


def test_a_pass_is_timed_by_its_slowest_process():
    """Under torchrun every process samples its share at once: a pass takes as long as its slowest process."""
    from types import SimpleNamespace

    class TwoProcesses:
        def all_gather(self, mine):
            return [mine, (3 * mine[0], 0.1, 0.2, 0.3)]

    two = SimpleNamespace(dist=TwoProcesses(), cfg=SimpleNamespace(repeats=1))
    passes, error = sweep._timed_passes(two, None, {"timing": (1.0, 0.5, 0.5, 0.0)})
    assert passes == [(3.0, 0.1, 0.2, 0.3)] and error is None
