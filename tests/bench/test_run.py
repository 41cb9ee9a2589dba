"""The benchmark harness end to end on analytic models: results, charts and report; resume after an
interruption; bad input; a 2-process (gloo) run agreeing with the 1-process run; an image model through
the offline ResNet-20 features and the offline-Inception message.  Small sample counts: CPU only."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pretrained
import solvers
from bench import report as report_mod
from bench import plan, run as run_mod
from pretrained.analytic import gmm2d
from pretrained.cards import ModelCard
from solvers import schedules
from tests.bench.image_models import mixture_image_card

ROOT = Path(__file__).resolve().parents[2]
ASSETS = pretrained.checkpoints.ASSETS  # $DIFFUSION_SOLVERS_ASSETS, else ../shared/assets beside the checkout
SWEEP = ["--model", "gmm2d", "--num-samples", "200", "--batch-size", "80", "--solvers", "ddim,dpmpp,heun",
         "--steps", "1,5,20"]


def bench(out: Path, *args: str) -> int:
    return run_mod.main(["--quiet", "--out", str(out), *args])


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")


def preview(out: Path, cell_id: str) -> np.ndarray:
    with np.load(out / "previews" / f"{cell_id}.npz") as z:
        return z["data"]


def _env():
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return env


# -- the sweep end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "gmm2d"
    assert bench(out, *SWEEP) == 0
    return out


def test_sweep_writes_one_row_per_cell_with_the_measured_nfe(sweep):
    df = results(sweep)
    assert len(df) == 9 and (df["status"] == "ok").all()
    assert sorted(zip(df["solver_label"], df["steps"])) == sorted(
        (s, n) for s in ("ddim", "dpmpp", "heun") for n in (1, 5, 20))
    assert set(df["solver"]) == {"ddim", "dpmpp_2m", "heun"}  # the alias resolved to the library's name
    # NFE as the library counted it: one call per step, Heun two per step but one on the step to σ = 0.
    for _, r in df.iterrows():
        expected = 2 * r["steps"] - 1 if r["solver"] == "heun" else r["steps"]
        assert r["nfe"] == expected == r["nfe_declared"]
    assert (df["time_total_s"] > 0).all()
    np.testing.assert_allclose(df["time_model_s"] + df["time_solver_s"], df["time_total_s"], rtol=1e-9)
    for col in ("num_samples", "seed", "device", "torch", "torch_fidelity", "git_commit", "command", "spacing"):
        assert df[col].notna().all(), col
    assert df["schema_version"].eq(1).all() and df["num_samples"].eq(200).all()


def test_every_cell_uses_the_same_seeds(sweep):
    # A 1-step grid ends at σ = 0, and every solver's step to σ = 0 returns D(x_T): with the same x_T in every
    # cell, the three 1-step cells must hold identical samples and identical metrics.
    df = results(sweep)
    one = df[df["steps"] == 1]
    first = preview(sweep, one["cell_id"].iloc[0])
    for cid in one["cell_id"]:
        np.testing.assert_array_equal(preview(sweep, cid), first)
    for col in ("metric.fd_data", "metric.swd", "metric.ode_error"):
        assert one[col].nunique() == 1


def test_quality_improves_with_steps_on_the_exact_model(sweep):
    df = results(sweep).set_index(["solver_label", "steps"])
    for s in ("ddim", "dpmpp", "heun"):
        assert df.loc[(s, 20), "metric.fd_data"] < df.loc[(s, 1), "metric.fd_data"] / 10
        assert df.loc[(s, 20), "metric.ode_error"] < df.loc[(s, 5), "metric.ode_error"]
    # DDIM is first order: 4× the steps, about 4× less error (at least 2× here, before the asymptotic regime).
    assert df.loc[("ddim", 5), "metric.ode_error"] / df.loc[("ddim", 20), "metric.ode_error"] > 2


def test_charts_and_reports_exist_and_agree_with_the_results(sweep):
    df = results(sweep)
    for k in ("fd_data", "swd", "ode_error"):
        for tag in ("time", "nfe"):
            assert (sweep / "figures" / f"{k}_vs_{tag}.png").read_bytes()[:4] == b"\x89PNG"
    for s in ("ddim", "dpmpp", "heun"):
        assert (sweep / "figures" / f"samples_{s}.png").exists()
    md = (sweep / "report.md").read_text()
    html = (sweep / "report.html").read_text()
    for _, r in df.iterrows():
        # Every metric value of the table appears, formatted the same way, in both reports.
        for col in ("metric.fd_data", "metric.swd", "metric.ode_error"):
            cell = report_mod._fmt(r[col])
            assert f"| {cell} |" in md and f"<td>{cell}</td>" in html
    images_in_md = md.count("](figures/")
    assert images_in_md == 6 + 3
    assert html.count('src="data:image/png;base64,') == images_in_md and 'src="figures/' not in html
    assert "Pareto frontier" in md and "Environment" in md and df["git_commit"].iloc[0] in md
    floors = json.loads((sweep / "reference.json").read_text())["metrics"]
    assert floors["fd_data"]["floor"][0] > 0 and floors["swd"]["floor"][1] > 0


def test_report_is_rebuilt_from_the_results_alone(sweep, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.csv", "reference.json", "previews"):
        src = sweep / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / name)
    assert report_mod.main([str(copy), "--quiet"]) == 0
    assert (copy / "report.md").read_text().replace(str(copy), str(sweep)) == (sweep / "report.md").read_text()
    assert (copy / "report.html").exists() and (copy / "figures" / "swd_vs_nfe.png").exists()
    assert report_mod.main([str(tmp_path / "nowhere"), "--quiet"]) == 2


# -- resume ---------------------------------------------------------------------------------------------------
# `python -c KILLED_AFTER_CELLS K ARGV…`: bench.run whose process dies, as if killed, right after the K-th cell's
# row is written — an interruption at a known point, without timing races (the fault is injected here, through
# the sweep's own record_row, not by a hook in the harness).
KILLED_AFTER_CELLS = """
import os, sys
import bench.sweep as sweep
record, written = sweep.record_row, []
def record_then_die(*args, **kwargs):
    record(*args, **kwargs)
    written.append(1)
    if len(written) == int(sys.argv[1]):
        os._exit(137)
sweep.record_row = record_then_die
from bench.run import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, capsys):
    out = tmp_path / "resume"
    # --threads 1: the killed subprocess and the resuming in-process runs time their cells alike (a folder
    # refuses cells timed under another thread count)
    args = ["--model", "gmm2d", "--num-samples", "100", "--solvers", "ddim,dpmpp", "--steps", "1,2,3",
            "--metric", "fd_data", "--no-report", "--threads", "1"]
    # The process dies (os._exit, as if killed) right after the 2nd cell is written.
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_CELLS, "2", "--quiet", "--out", str(out), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr
    before = results(out)
    assert len(before) == 2 and (before["status"] == "ok").all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written files
    capsys.readouterr()
    assert run_mod.main(["--out", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert "6 cells (4 to run; skipping 2 done)" in err
    after = results(out)
    assert len(after) == 6 and (after["status"] == "ok").all()
    pd.testing.assert_frame_equal(after.iloc[:2], before)  # the finished cells were not redone
    assert run_mod.main(["--out", str(out), *args]) == 0
    assert "6 cells (0 to run; skipping 6 done)" in capsys.readouterr().err
    assert run_mod.main(["--out", str(out), "--force", *args]) == 0
    assert "6 cells (6 to run" in capsys.readouterr().err
    assert len(results(out)) == 6


# -- bad input --------------------------------------------------------------------------------------------------
def _card_with_loader(name: str, loader) -> ModelCard:
    return ModelCard(name=name, kind="analytic", description="a loader under test", loader=loader,
                     sample_shape=(2,), prediction="eps", schedule_name="VPLinear", reference="none")


def test_an_option_the_loader_does_not_take_is_refused_naming_what_it_takes(tmp_path, monkeypatch, capsys):
    def loader(device="cpu", clip_x0=None):
        raise AssertionError("the loader must not run")

    monkeypatch.setitem(pretrained.CARDS, "opt2d", _card_with_loader("opt2d", loader))
    assert bench(tmp_path / "o", "--model", "opt2d", "--model-opt", "colour=1", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "--model-opt: opt2d's loader does not take these options" in err and "it takes: clip_x0" in err


def test_a_type_error_inside_the_loader_is_not_blamed_on_model_opt(tmp_path, monkeypatch, capsys):
    def loader(device="cpu"):
        return solvers.DiffusionModel(lambda x, t: x, schedule=schedules.VPLinear(), prediction="eps",
                                      not_an_option=1)

    monkeypatch.setitem(pretrained.CARDS, "bad2d", _card_with_loader("bad2d", loader))
    assert bench(tmp_path / "b", "--model", "bad2d", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "cannot load bad2d: its loader raised TypeError" in err and "not_an_option" in err
    assert "--model-opt" not in err


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'; available models: .*gmm2d"),
    (["--solvers", "ddim,nope"], "unknown solver 'nope'; valid: .*dpmpp_2m"),
    (["--metric", "nope"], "unknown metric 'nope'; valid metrics: fd_data, swd, ode_error, ref_error, fid, fd_resnet20"),
    (["--metric", "fid"], "does not fit model 'gmm2d'.*metrics for gmm2d: fd_data, swd, ode_error"),
    (["--model", "gmm", "--metric", "fd_resnet20"], "does not fit model 'gmm'"),
    (["--steps", "0,10"], "positive integers .*'0' is not one"),
    (["--steps", "-3"], "'-3' is not one"),
    (["--steps", "2.5"], "'2.5' is not one"),
    (["--steps", "ten"], "'ten' is not one"),
    (["--solver-opt", "nope=1"], "no listed solver has an option 'nope'"),
    (["--solvers", "ddim", "--solver-opt", "eta=3"], "eta must be in \\[0, 1\\]"),
    (["--num-samples", "1"], "at least 2"),
])
def test_bad_input_is_refused_with_the_valid_choices(tmp_path, capsys, args, message):
    import re
    out = tmp_path / "out"
    assert bench(out, *args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()  # nothing written


def _nan_card(name: str) -> ModelCard:
    """gmm2d's exact network, but NaN wherever it is evaluated below t = 0.5."""
    mixture, schedule = gmm2d(), schedules.VPLinear()

    def loader(device="cpu", **kw):
        exact = mixture.network(schedule, "eps")

        def fn(x, t):
            out = exact(x, t)
            return out if float(torch.as_tensor(t).reshape(-1)[0]) >= 0.5 else torch.full_like(out, float("nan"))

        return solvers.DiffusionModel(fn, schedule=schedule, prediction="eps")

    return ModelCard(name=name, kind="analytic", description="NaN below t = 0.5", loader=loader,
                     sample_shape=(2,), prediction="eps", schedule_name="VPLinear",
                     data_sampler=lambda n, seed=0: mixture.sample(n, seed), default_num_samples=100,
                     default_batch_size=100)


def test_a_model_with_nan_samples_fails_its_cells_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.CARDS, "nan2d", _nan_card("nan2d"))
    out = tmp_path / "nan"
    # 1 step evaluates the network at t = 1 only; 4 steps (uniform in t) also at 0.25: NaN.
    assert bench(out, "--model", "nan2d", "--solvers", "ddim,ddpm", "--steps", "1,4") == 0
    df = results(out).set_index(["solver_label", "steps"])
    assert df.loc[("ddim", 1), "status"] == "ok" and df.loc[("ddpm", 1), "status"] == "ok"
    for s in ("ddim", "ddpm"):
        assert df.loc[(s, 4), "status"] == "failed"
        assert "NonFiniteError" in df.loc[(s, 4), "error"] and "NaN" in df.loc[(s, 4), "error"]
        assert np.isnan(df.loc[(s, 4), "metric.fd_data"])
    md = (out / "report.md").read_text()
    assert "Failed cells" in md and "NonFiniteError" in md


def test_results_of_another_schema_version_are_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    old = "schema_version,cell_key,status\n0,abc,ok\n"
    (out / "results.csv").write_text(old)
    assert bench(out, "--steps", "1", "--solvers", "ddim", "--num-samples", "20") == 2
    err = capsys.readouterr().err
    assert "schema version 0" in err and "writes version 1" in err and "left as it is" in err
    assert (out / "results.csv").read_text() == old
    (out / "results.csv").write_text("a,b\n1,2\n")
    assert bench(out, "--steps", "1", "--solvers", "ddim", "--num-samples", "20") == 2
    assert "no schema_version column" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "a,b\n1,2\n"


def test_results_of_other_run_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "settings"
    common = ["--solvers", "ddim", "--steps", "1", "--metric", "fd_data", "--no-report"]
    assert bench(out, "--num-samples", "20", *common) == 0
    before = (out / "results.csv").read_bytes()
    assert bench(out, "--num-samples", "30", *common) == 2
    err = capsys.readouterr().err
    assert "num_samples: 20 in the file vs 30 now" in err and "another --out" in err
    assert (out / "results.csv").read_bytes() == before


def test_solver_options_and_default_spacings():
    specs = plan.parse_solvers("ddim,ddim:eta=1.0,dpmpp", ["ddim.eta=0.5", "lower_order_final=False"])
    assert [(s.label, s.name, s.options) for s in specs] == [
        ("ddim", "ddim", {"eta": 0.5}), ("ddim:eta=1.0", "ddim", {"eta": 1.0}),
        ("dpmpp", "dpmpp_2m", {"lower_order_final": False})]
    cifar = pretrained.get_card("ddpm_cifar")
    discrete = schedules.DiscreteVP.linear(1000)
    # DDIM's Table 1 grid on CIFAR-10; at 1000 steps it would repeat indices, and every index is used instead.
    assert plan.default_spacing(cifar, discrete, "ddim", 10)[0] == "quadratic"
    spacing = plan.default_spacing(cifar, discrete, "ddpm", 1000)[0]
    assert solvers.make_grid(discrete, 1000, spacing=spacing)[:-1] == [float(i) for i in range(999, -1, -1)]
    assert plan.default_spacing(pretrained.get_card("gmm2d"), discrete, "ddim", 1)[0] == "trailing"
    assert plan.default_spacing(cifar, discrete, "dpmpp_2m", 10)[0] == "logsnr"
    assert plan.default_spacing(cifar, discrete, "heun", 10)[0] == "karras"
    assert plan.parse_steps("50,1,10,10") == [1, 10, 50]


# -- more than one process ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_give_the_results_of_one(tmp_path):
    args = ["--model", "gmm2d", "--num-samples", "120", "--batch-size", "30", "--solvers", "ddim,ddpm",
            "--steps", "1,4", "--device", "cpu", "--no-report", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_mod.main(["--out", str(one), *args]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bench.run", "--out", str(two), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = results(one), results(two)
    assert (b["world_size"] == 2).all() and (a["world_size"] == 1).all()
    assert b["command"].str.startswith("torchrun --nproc_per_node=2 -m bench.run").all()
    assert list(a["cell_key"]) == list(b["cell_key"]) and (b["status"] == "ok").all()
    np.testing.assert_array_equal(a["nfe"], b["nfe"])
    for col in ("metric.fd_data", "metric.swd"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-12)
    # The exact ODE solution is integrated per process (batch-coupled step sizes, tolerance 1e-9).
    np.testing.assert_allclose(b["metric.ode_error"], a["metric.ode_error"], rtol=1e-6)
    for cid in a["cell_id"]:
        np.testing.assert_array_equal(preview(two, cid), preview(one, cid))
    # Each process samples half of the 120 in the slowest process's time: the time per sample on one device is
    # that time over 60 samples (= over 120, times the 2 processes).
    np.testing.assert_allclose(b["time_per_sample_ms"], 1000 * b["time_total_s"] / 60, rtol=1e-9)
    np.testing.assert_allclose(a["time_per_sample_ms"], 1000 * a["time_total_s"] / 120, rtol=1e-9)


# -- an image model ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ((ASSETS / "mnist").is_dir() and (ASSETS / "resnet20_cifar").is_dir()),
                    reason="../shared/assets/mnist/ or ../shared/assets/resnet20_cifar/ is absent")
def test_image_model_with_offline_resnet20_features(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.CARDS, "img_mix", mixture_image_card("img_mix"))
    out = tmp_path / "img"
    args = ["--model", "img_mix", "--solvers", "ddim,dpmpp", "--steps", "1,4", "--reference-size", "300",
            "--cache-dir", str(tmp_path / "cache")]
    assert bench(out, *args) == 0
    df = results(out)
    assert (df["status"] == "ok").all() and df["metrics"].eq("fd_resnet20").all()
    assert json.loads(df["metric_labels"].iloc[0]) == {"fd_resnet20": "FD (ResNet-20)"}
    assert (df["metric.fd_resnet20"] > 0).all()
    assert preview(out, df["cell_id"].iloc[0]).shape == (64, 3, 28, 28)
    md = (out / "report.md").read_text()
    assert "| FD (ResNet-20) |" in md and "FID (" not in md  # never labelled as FID
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_fid_offline_stops_before_sampling_with_the_alternative(tmp_path, monkeypatch, capsys):
    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setitem(pretrained.CARDS, "img_mix", mixture_image_card("img_mix"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    out = tmp_path / "fid"
    assert bench(out, "--model", "img_mix", "--metric", "fid", "--steps", "1", "--solvers", "ddim") == 1
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "--metric fd_resnet20" in err and "not FID" in err
    assert not (out / "results.csv").exists()


# -- refused before any work ---------------------------------------------------------------------------------------
def _no_load(monkeypatch) -> list:
    """Record every model load: a refusal "before any work" must not reach one."""
    calls = []
    monkeypatch.setattr(run_mod.pretrained, "load", lambda *a, **k: calls.append(a) or pytest.fail("loaded"))
    return calls


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("mps", None, "--device mps was asked for but MPS .* is not available here; use --device cpu"),
    ("cuda", 0, "--device cuda was asked for but CUDA is not available here; use --device cpu"),
    ("cuda:5", 2, "--device cuda:5: this machine has 2 CUDA device\\(s\\), cuda:0 … cuda:1; use one of them"),
    ("meta", None, "--device meta holds no data"),
    ("nonsense", None, "--device 'nonsense' is not a torch device"),
])
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys, monkeypatch, device,
                                                                cuda_devices, message):
    import re
    if cuda_devices is not None:  # pretend to be a machine with that many CUDA devices
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    elif device == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    calls = _no_load(monkeypatch)
    out = tmp_path / "dev"
    assert bench(out, "--device", device, "--steps", "1", "--solvers", "ddim") == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not calls


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    calls = _no_load(monkeypatch)
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    assert bench(a_file, "--steps", "1", "--solvers", "ddim") == 2
    assert f"--out {a_file} is not a directory; give a directory" in capsys.readouterr().err
    assert bench(a_file / "sub", "--steps", "1", "--solvers", "ddim") == 2
    assert f"is not a directory (its parent {a_file} is a file)" in capsys.readouterr().err
    assert a_file.read_text() == "mine" and not calls


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    calls = _no_load(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert bench(locked / "out", "--steps", "1", "--solvers", "ddim") == 2
    finally:
        locked.chmod(0o700)
    assert f"{locked} is not writable by this user" in capsys.readouterr().err
    assert not calls


def test_a_missing_weights_file_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    calls = _no_load(monkeypatch)
    missing = tmp_path / "nope.pth"
    out = tmp_path / "w"
    assert bench(out, "--model", "ddpm_mnist", "--weights", str(missing), "--steps", "1", "--solvers", "ddim") == 2
    err = capsys.readouterr().err
    assert err == (f"bench.run: error: --weights {missing}: no such file or folder; give the model's weights file "
                   "(or the folder holding it), or leave --weights out to use the card's lookup\n")
    assert not out.exists() and not calls


def test_unavailable_weights_are_one_line_and_the_traceback_only_with_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSION_SOLVERS_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSION_SOLVERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_CIFAR_WEIGHTS", raising=False)
    out = tmp_path / "cifar"
    args = ["--model", "ddpm_cifar", "--steps", "1", "--solvers", "ddim", "--num-samples", "4"]
    assert bench(out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.run: error: ") and err.count("\n") == 1, err
    assert "downloads are switched off (offline)" in err and "DDPM_CIFAR_WEIGHTS" in err
    assert bench(out, *args, "--debug") == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "WeightsNotFoundError" in err
    assert err.splitlines()[-1].startswith("bench.run: error: ")
    assert not (out / "results.csv").exists()


# -- failed cells ------------------------------------------------------------------------------------------------------
def test_a_sweep_in_which_every_cell_failed_exits_1_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pretrained.CARDS, "nan2d", _nan_card("nan2d"))
    out = tmp_path / "allnan"
    assert bench(out, "--model", "nan2d", "--solvers", "ddim,ddpm", "--steps", "4", "--no-report") == 1
    err = capsys.readouterr().err
    assert "bench.run: error: every cell of this run failed (2 of 2), so nothing was measured; first: ddim × 4 " \
           "steps: NonFiniteError" in err
    assert "--force redoes them" in err
    assert (results(out)["status"] == "failed").all() and len(results(out)) == 2


def test_a_rerun_skips_cells_recorded_as_failed_unless_forced(tmp_path, monkeypatch, capsys):
    # Documented in --force's help and the README: a failure is a result; a plain rerun skips it and says so.
    monkeypatch.setitem(pretrained.CARDS, "nan2d", _nan_card("nan2d"))
    out = tmp_path / "rerun"
    args = ["--out", str(out), "--model", "nan2d", "--solvers", "ddim", "--steps", "1,4", "--no-report"]
    assert run_mod.main(args) == 0
    before = results(out).set_index("steps")
    assert before.loc[4, "status"] == "failed" and before.loc[1, "status"] == "ok"
    capsys.readouterr()
    assert run_mod.main(args) == 0
    assert "2 cells (0 to run; skipping 1 done and 1 recorded as failed — --force redoes them)" \
        in capsys.readouterr().err
    pd.testing.assert_frame_equal(results(out).set_index("steps"), before)  # the failed row was not redone
    assert run_mod.main([*args, "--force"]) == 0
    assert "2 cells (2 to run" in capsys.readouterr().err
    after = results(out).set_index("steps")
    assert after.loc[4, "status"] == "failed" and after.loc[4, "started_at"] >= before.loc[4, "started_at"]
    assert after.loc[4, "time_cell_s"] != before.loc[4, "time_cell_s"]  # written again
    assert "--force" in run_mod.build_parser().format_help() and "recorded as failed" in \
        " ".join(run_mod.build_parser().format_help().split())


# -- logs ------------------------------------------------------------------------------------------------------------------
def test_a_log_gets_one_plain_line_per_cell_and_no_carriage_returns(tmp_path, capsys):
    # capsys's stderr is not a terminal, like a log file
    out = tmp_path / "log"
    assert run_mod.main(["--out", str(out), "--model", "gmm2d", "--solvers", "ddim,dpmpp", "--steps", "1,2",
                         "--num-samples", "40", "--batch-size", "20", "--metric", "fd_data", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    cell_lines = [line for line in err.splitlines() if " steps: NFE " in line]
    assert len(cell_lines) == 4
    assert [line.split()[:2] for line in cell_lines] == [["ddim", "1"], ["ddim", "2"], ["dpmpp", "1"], ["dpmpp", "2"]]


def test_a_cell_failed_by_its_environment_is_redone_by_a_plain_rerun(tmp_path, monkeypatch, capsys):
    """Disk full while a cell writes its optimised grid is the environment's fault, not a result: the row says
    so (failure_kind), and a rerun without --force redoes that cell, while a model's failure stays skipped."""
    import errno

    from bench import results as results_mod
    out = tmp_path / "enospc"
    args = ["--out", str(out), "--model", "gmm2d", "--solvers", "dpmpp_2m", "--steps", "2,3", "--spacing",
            "optimized", "--num-samples", "16", "--metric", "fd_data", "--no-report"]
    real = results_mod.atomic_write_text

    def disk_full_for_the_two_step_grid(path, text):
        if "-s2-" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr("bench.sweep.atomic_write_text", disk_full_for_the_two_step_grid)
    assert run_mod.main(args) == 0
    df = results(out).set_index("steps")
    assert df["status"].tolist() == ["failed", "ok"] and df.loc[3, "failure_kind"] != df.loc[3, "failure_kind"]
    assert df.loc[2, "failure_kind"] == "environment" and "No space left on device" in df.loc[2, "error"]
    monkeypatch.setattr("bench.sweep.atomic_write_text", real)
    capsys.readouterr()
    assert run_mod.main(args) == 0
    assert ("2 cells (1 to run; skipping 1 done; redoing 1 that failed by a fault of its environment"
            in capsys.readouterr().err)
    after = results(out).set_index("steps")
    assert after["status"].tolist() == ["ok", "ok"] and after.loc[3, "started_at"] == df.loc[3, "started_at"]
    help_text = " ".join(run_mod.build_parser().format_help().split())
    assert "a fault of its environment" in help_text


def test_when_every_cell_failed_by_its_environment_the_error_says_a_plain_rerun_redoes_them(tmp_path, monkeypatch,
                                                                                            capsys):
    import errno

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bench.sweep.atomic_write_text", disk_full)
    assert run_mod.main(["--out", str(tmp_path / "full"), "--model", "gmm2d", "--solvers", "dpmpp_2m", "--steps",
                         "2", "--spacing", "optimized", "--num-samples", "16", "--metric", "fd_data",
                         "--no-report"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every cell of this run failed" in err and "a plain rerun redoes them" in err and "--force" not in err


def test_failed_rows_of_files_from_before_failure_kind_stay_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pretrained.CARDS, "nan2d", _nan_card("nan2d"))
    out = tmp_path / "old"
    args = ["--out", str(out), "--model", "nan2d", "--solvers", "ddim", "--steps", "1,4", "--no-report"]
    assert run_mod.main(args) == 0
    assert results(out).set_index("steps").loc[4, "failure_kind"] == "result"  # the model's NaN: a result
    results(out).drop(columns=["failure_kind"]).to_csv(out / "results.csv", index=False)
    capsys.readouterr()
    assert run_mod.main(args) == 0
    assert "2 cells (0 to run; skipping 1 done and 1 recorded as failed — --force redoes them)" \
        in capsys.readouterr().err
