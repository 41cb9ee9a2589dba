"""bench.run --spacing optimized: each cell's grid calibrated by solvers.optimize_timesteps on seeds disjoint from
the evaluated ones, cached in the run folder, recorded in the row, shown beside the default grid in the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import run as run_mod
from bench.sweep import CALIBRATION_FOLDER, calibration_seeds, sample_seeds

SWEEP = ["--model", "gmm2d", "--num-samples", "128", "--batch-size", "128", "--steps", "5", "--solvers",
         "dpmpp_2m", "--metric", "ode_error"]


def _row(out: Path) -> pd.Series:
    return pd.read_csv(out / "results.csv").iloc[0]


def test_optimized_grids_beat_the_default_on_the_evaluated_samples_and_are_cached(tmp_path, capsys):
    assert run_mod.main(["--quiet", "--out", str(tmp_path / "default"), *SWEEP]) == 0
    assert run_mod.main(["--out", str(tmp_path / "opt"), "--spacing", "optimized", *SWEEP]) == 0
    assert "optimizing the dpmpp_2m × 5-step grid on 64 calibration samples" in capsys.readouterr().err
    default, opt = _row(tmp_path / "default"), _row(tmp_path / "opt")
    # the evaluated samples are not the calibration ones: this is a held-out improvement
    assert opt["metric.ode_error"] < 0.5 * default["metric.ode_error"], (opt["metric.ode_error"],
                                                                          default["metric.ode_error"])
    record = json.loads(opt["grid_calibration"])
    grid = json.loads(opt["timesteps"])
    assert grid == record["optimized"] and record["default"] == json.loads(default["timesteps"])
    assert grid[0] == record["default"][0] and grid[-2:] == record["default"][-2:]  # ends kept
    assert all(a > b for a, b in zip(grid, grid[1:])) and len(grid) == 6
    assert opt["spacing"] == "optimized" and record["from"] == default["spacing"] == "logsnr"
    assert record["error_after"] < record["error_before"]
    # a rerun reads the cached grid: no new calibration, the same samples
    cached = list((tmp_path / "opt" / CALIBRATION_FOLDER).glob("*.json"))
    assert len(cached) == 1
    assert run_mod.main(["--out", str(tmp_path / "opt"), "--spacing", "optimized", "--force", *SWEEP]) == 0
    assert "optimizing" not in capsys.readouterr().err
    again = _row(tmp_path / "opt")
    assert json.loads(again["timesteps"]) == grid
    assert again["metric.ode_error"] == pytest.approx(opt["metric.ode_error"], rel=1e-12)
    report = (tmp_path / "opt" / "report.md").read_text()
    assert "### Optimized grids" in report and "| dpmpp_2m | 5 | logsnr: 1, " in report


def test_calibration_seeds_are_disjoint_from_the_evaluated_samples():
    for seed in (0, 1, 7):
        evaluated = set(sample_seeds(seed, 0, 100_000))
        calib = calibration_seeds(seed, 64)
        assert len(set(calib)) == 64 and not evaluated & set(calib)
        assert not set(calib) & set(sample_seeds(seed + 1, 0, 10)) and not set(calib) & set(sample_seeds(seed - 1 if seed else 1, 0, 10))


@pytest.mark.parametrize("solvers, message", [
    ("ddpm", "ddpm draws noise with these options, so there is no fixed grid to optimise"),
    ("adaptive", "adaptive chooses its own steps"),
    ("ddim:eta=1.0", "ddim:eta=1.0 draws noise"),
])
def test_stochastic_and_adaptive_solvers_are_refused_before_any_work(tmp_path, capsys, solvers, message):
    out = tmp_path / "bad"
    assert run_mod.main(["--quiet", "--out", str(out), "--spacing", "optimized", "--solvers", solvers,
                         "--steps", "5"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_row_records_every_cell_grid(tmp_path):
    assert run_mod.main(["--quiet", "--out", str(tmp_path / "g"), *SWEEP]) == 0
    row = _row(tmp_path / "g")
    grid = json.loads(row["timesteps"])
    assert len(grid) == 6 and grid[0] == row["t_start"] and grid[-1] == row["t_end"]
    assert json.loads(row["grid_calibration"]) == {}
    assert np.isfinite(row["metric.ode_error"])


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_damaged_cached_grid_is_checked_named_and_computed_again(tmp_path, capsys, damage):
    out = tmp_path / "opt"
    args = ["--out", str(out), "--spacing", "optimized", *SWEEP[:-1], "fd_data", "--no-report"]
    assert run_mod.main(["--quiet", *args]) == 0
    grid = json.loads(_row(out)["timesteps"])
    (path,) = (out / CALIBRATION_FOLDER).glob("*.json")
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    else:  # still valid JSON, a grid with one time moved
        record = json.loads(text)
        record["optimized"][2] = 0.5 * (record["optimized"][1] + record["optimized"][2])
        path.write_text(json.dumps(record))
    capsys.readouterr()
    assert run_mod.main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert f"the cached grid {path} fails its check" in err and "computing it again" in err
    assert "optimizing the dpmpp_2m × 5-step grid" in err
    assert json.loads(_row(out)["timesteps"]) == grid and _row(out)["status"] == "ok"
    assert json.loads(path.read_text())["optimized"] == grid  # written again, whole
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_steps_above_the_optimizers_limit_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--spacing optimized --steps 5,1001 used to load the model, run the 5-step cell and fail only when the
    1001-step cell's grid was calibrated; now it is a usage error (status 2) naming the limit, before any load."""
    from solvers.optimize import MAX_STEPS

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("pretrained.load", no_load)
    out = tmp_path / "big"
    assert run_mod.main(["--quiet", "--out", str(out), "--spacing", "optimized", "--solvers", "dpmpp_2m",
                         "--steps", f"5,{MAX_STEPS + 1}"]) == 2
    err = capsys.readouterr().err
    assert (f"--spacing optimized: --steps {MAX_STEPS + 1} is above the optimiser's limit of {MAX_STEPS:,} steps"
            in err), err
    assert not out.exists()
