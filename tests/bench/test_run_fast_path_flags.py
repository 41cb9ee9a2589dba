"""bench.run's fast-path flags (--autocast, --channels-last, --compile, --cuda-graph, --rng, --batch-size auto)
and the run settings they record: recorded, compared on resume, refused when they do not fit."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import config, run as run_mod
from bench.results import RUN_SETTING_DEFAULTS, IncompatibleResultsError


# -- bench.run: the new flags and run settings ----------------------------------------------------------------
QUICK = ["--quiet", "--model", "gmm2d", "--num-samples", "40", "--solvers", "ddim,ddpm", "--steps", "1,2",
         "--metric", "fd_data"]


def _results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")


def _preview(out: Path, cell_id: str) -> np.ndarray:
    with np.load(out / "previews" / f"{cell_id}.npz") as z:
        return z["data"]


@pytest.fixture(scope="module")
def bf16_philox_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fast") / "bf16_philox"
    assert run_mod.run(["--out", str(out), *QUICK, "--autocast", "bf16", "--rng", "philox"]) == out
    return out


def test_run_records_the_network_and_rng_settings(bf16_philox_run):
    df = _results(bf16_philox_run)
    assert len(df) == 4 and (df["status"] == "ok").all()
    assert (df["network"] == "autocast=bf16").all()
    assert (df["rng"] == "philox").all()
    md = (bf16_philox_run / "report.md").read_text()
    assert "network call: autocast=bf16" in md
    assert "noise: philox generators" in md


def test_run_rng_changes_the_samples(bf16_philox_run, tmp_path):
    out = tmp_path / "torch_rng"
    run_mod.run(["--out", str(out), *QUICK, "--autocast", "bf16", "--no-report"])
    a, b = _results(bf16_philox_run), _results(out)
    assert (b["rng"] == "torch").all() and (b["network"] == "autocast=bf16").all()
    assert list(a["cell_key"]) == list(b["cell_key"])  # the same cells ...
    for cid in a["cell_id"]:
        assert not np.array_equal(_preview(bf16_philox_run, cid), _preview(out, cid))  # ... other noise


def test_default_run_records_the_default_settings(tmp_path):
    out = tmp_path / "default"
    run_mod.run(["--out", str(out), *QUICK, "--no-report"])
    df = _results(out)
    assert RUN_SETTING_DEFAULTS == {"network": "eager", "rng": "torch"}
    assert (df["network"] == "eager").all() and (df["rng"] == "torch").all()


def test_batch_size_auto_records_an_integer_batch(tmp_path, single_thread):
    out = tmp_path / "auto"
    run_mod.run(["--out", str(out), *QUICK, "--batch-size", "auto", "--no-report"])
    df = _results(out)
    assert (df["status"] == "ok").all()
    assert pd.api.types.is_integer_dtype(df["batch_size"])
    bs = set(df["batch_size"])
    assert len(bs) == 1 and 1 <= next(iter(bs)) <= 40


def test_a_different_network_setting_is_refused_and_the_file_kept(tmp_path, capsys):
    out = tmp_path / "mixed"
    args = ["--out", str(out), *QUICK[:-4], "--steps", "1", "--metric", "fd_data", "--no-report"]
    run_mod.run(args)
    before = (out / "results.csv").read_bytes()
    with pytest.raises(IncompatibleResultsError, match=r"network: eager in the file vs autocast=bf16 now"):
        run_mod.run([*args, "--autocast", "bf16"])
    assert (out / "results.csv").read_bytes() == before
    with pytest.raises(IncompatibleResultsError, match=r"rng: torch in the file vs philox now"):
        run_mod.run([*args, "--rng", "philox"])
    assert (out / "results.csv").read_bytes() == before
    capsys.readouterr()
    assert run_mod.main([*args, "--channels-last"]) == 2
    assert "network: eager in the file vs channels_last now" in capsys.readouterr().err
    assert (out / "results.csv").read_bytes() == before


def test_a_results_file_from_before_the_new_settings_is_extended(tmp_path):
    out = tmp_path / "old_file"
    base = ["--out", str(out), "--quiet", "--model", "gmm2d", "--num-samples", "20", "--solvers", "ddim",
            "--metric", "fd_data", "--no-report"]
    run_mod.run([*base, "--steps", "1"])
    old = _results(out).drop(columns=["network", "rng"])
    old.to_csv(out / "results.csv", index=False)
    # a default run resumes it ...
    run_mod.run([*base, "--steps", "1,2"])
    df = _results(out)
    assert len(df) == 2 and list(df["steps"]) == [1, 2] and (df["status"] == "ok").all()
    assert df.loc[df["steps"] == 2, "network"].tolist() == ["eager"]
    # ... and the table it wrote (old rows without the settings, new rows with them) is extended again
    run_mod.run([*base, "--steps", "1,2,3"])
    df = _results(out)
    assert list(df["steps"]) == [1, 2, 3]
    # a non-default setting is still refused against the old rows
    before = (out / "results.csv").read_bytes()
    with pytest.raises(IncompatibleResultsError, match="rng"):
        run_mod.run([*base, "--steps", "1,2,3,4", "--rng", "philox"])
    assert (out / "results.csv").read_bytes() == before
    # and so against a file that lacks the columns altogether
    old.to_csv(out / "results.csv", index=False)
    with pytest.raises(IncompatibleResultsError, match=r"network: \(missing in the file\) vs 'autocast=bf16'"):
        run_mod.run([*base, "--steps", "1,2", "--autocast", "bf16"])


@pytest.mark.parametrize("args, message", [
    (["--cuda-graph"], "--cuda-graph needs a CUDA device; this run is on cpu"),
    (["--batch-size", "0"], "--batch-size must be a positive integer or 'auto', got 0"),
    (["--batch-size", "foo"], "--batch-size must be a positive integer or 'auto', got 'foo'"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer or 'auto'"),
    (["--compile", "fastest"], "compile must be True/False or a torch.compile mode"),
])
def test_bad_fast_path_flags_are_usage_errors(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    with pytest.raises(run_mod.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_mod.run(["--out", str(out), "--device", "cpu", *QUICK, *args])
    assert run_mod.main(["--out", str(out), "--device", "cpu", *QUICK, *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--autocast", "fp32"], ["--rng", "mt19937"]])
def test_fast_path_flags_have_fixed_choices(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_mod.build_parser().parse_args(args)
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_network_setting_names_every_fast_path():
    def ns(**kw):
        base = dict(autocast=None, channels_last=False, compile=None, cuda_graph=False)
        return argparse.Namespace(**{**base, **kw})

    assert config.network_setting(ns()) == "eager"
    assert config.network_setting(ns(autocast="bf16")) == "autocast=bf16"
    assert config.network_setting(ns(autocast="fp16", channels_last=True, compile="default", cuda_graph=True)) == \
        "autocast=fp16,channels_last,compile=default,cuda_graph"
    assert config.network_setting(ns(compile="max-autotune")) == "compile=max-autotune"
    p = run_mod.build_parser()
    assert p.parse_args(["--compile"]).compile == "default"
    assert p.parse_args(["--compile", "max-autotune"]).compile == "max-autotune"
    assert p.parse_args([]).compile is None and p.parse_args([]).rng == "torch"


def test_run_refuses_graphs_and_compile_for_the_adaptive_solver(tmp_path):
    for flag in (["--compile"], ["--cuda-graph", "--device", "cpu"]):
        with pytest.raises(run_mod.UsageError):
            run_mod.run(["--out", str(tmp_path / "x"), "--solvers", "adaptive", "--steps", "2", "--num-samples", "8",
                         "--quiet", "--no-report", *flag])
    assert not (tmp_path / "x" / "results.csv").exists()
    with pytest.raises(run_mod.UsageError, match="adaptive solver calls the network on a varying number of rows"):
        run_mod.run(["--out", str(tmp_path / "y"), "--solvers", "ddim,adaptive", "--steps", "2", "--num-samples", "8",
                     "--quiet", "--no-report", "--compile"])
