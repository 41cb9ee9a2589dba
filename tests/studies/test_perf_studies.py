"""The performance studies' helpers (bench.studies.perf_studies, bench.perf scaling) and bench.gpu_check's refusal without
CUDA; the tests that need the offline assets (ddpm_mnist, ResNet-20) skip with the reason when they are absent."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from bench.studies import perf_studies as PS
from pretrained.checkpoints import ASSETS


# -- bench.studies.perf_studies --------------------------------------------------------------------------------------
def test_linear_fit_on_a_line_and_on_noise():
    x = [1.0, 2.0, 4.0, 8.0, 16.0]
    fit = PS.linear_fit(x, [0.5 + 3.0 * v for v in x])
    assert fit["slope"] == pytest.approx(3.0, abs=1e-12) and fit["intercept"] == pytest.approx(0.5, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    two = PS.linear_fit([2, 5], [1, 7])
    assert two["slope"] == pytest.approx(2.0) and two["intercept"] == pytest.approx(-3.0) and two["r2"] == pytest.approx(1.0)
    flat = PS.linear_fit([1, 2, 3], [4, 4, 4])  # a constant: no variance to explain
    assert flat["slope"] == pytest.approx(0.0, abs=1e-12) and flat["r2"] == 1.0
    rng = np.random.default_rng(0)
    xs = np.arange(20.0)
    ys = 1.0 + 2.0 * xs + rng.normal(0, 3.0, xs.size)
    noisy = PS.linear_fit(xs, ys)
    assert 0.5 < noisy["r2"] < 1.0
    assert noisy["slope"] == pytest.approx(2.0, abs=0.5)
    b, a = np.polyfit(xs, ys, 1)
    resid = ys - (a + b * xs)
    assert noisy["r2"] == pytest.approx(1 - resid @ resid / ((ys - ys.mean()) @ (ys - ys.mean())), rel=1e-12)
    for bad in ([], [1.0]):
        with pytest.raises(ValueError, match="at least two points"):
            PS.linear_fit(bad, bad)


def test_random_inception_weights_load_in_torch_fidelity(tmp_path, single_thread):
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = fe.load_state_dict_from_url
    path = PS.random_inception_weights(tmp_path / "inception-random.pth")
    assert path == tmp_path / "inception-random.pth" and path.stat().st_size > 50 * 2**20
    assert fe.load_state_dict_from_url is original  # the patch is undone
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) > 100 and all(torch.isfinite(v.float()).all() for v in state.values())
    model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=str(path)).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (feats,) = model(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert not torch.equal(feats[0], feats[1])


needs_mnist_assets = pytest.mark.skipif(
    not ((ASSETS / "ddpm_mnist").is_dir() and (ASSETS / "resnet20_cifar").is_dir()),
    reason=f"{ASSETS}/ddpm_mnist or {ASSETS}/resnet20_cifar is absent (offline ddpm_mnist weights and "
           "ResNet-20 features are needed)")


@needs_mnist_assets
def test_run_scaling_on_ddpm_mnist(single_thread):
    res = PS.run_scaling("ddpm_mnist", samples=(4, 16), steps=(1, 4), batch=4, fixed_steps=1, progress=False)
    assert [r["n"] for r in res["by_samples"]] == [4, 16]
    assert [r["steps"] for r in res["by_steps"]] == [1, 4]
    assert res["steps_samples"] == 4 and res["metric"] == "fd_resnet20" and res["autocast"] is None
    for key in ("fit_sampling_samples", "fit_features_samples", "fit_sampling_steps"):
        fit = res[key]
        assert fit["slope"] > 0, (key, fit)
        assert fit["r2"] == pytest.approx(1.0)  # two points
    for r in res["by_samples"]:
        assert r["sampling_s"] > 0 and r["features_s"] > 0
    text = PS.format_scaling(res, "python -m bench.perf scaling --test", "a test machine")
    assert text.startswith("Command: `python -m bench.perf scaling --test`")
    for header in ("| samples | sampling s | feature extraction s | sampling share |", "| steps | sampling s | s per step |",
                   "| what | a (s) | b | R² |", "| samples | steps | sampling s | features s | sampling share |"):
        assert header in text
    assert "| 4 | " in text and "| 16 | " in text and "ResNet-20" in text and "eager float32" in text


def test_format_scaling_numbers():
    res = {"model": "ddpm_mnist", "solver": "ddim", "fixed_steps": 10, "batch": 100, "metric": "fid",
           "device": "cpu", "inception_random": True, "autocast": "bf16", "cuda_graph": True, "steps_samples": 100,
           "by_samples": [{"n": 100, "sampling_s": 3.0, "features_s": 1.0}, {"n": 200, "sampling_s": 6.0, "features_s": 2.0}],
           "by_steps": [{"steps": 5, "sampling_s": 1.5}, {"steps": 10, "sampling_s": 3.0}]}
    res["fit_sampling_samples"] = PS.linear_fit([100, 200], [3.0, 6.0])
    res["fit_features_samples"] = PS.linear_fit([100, 200], [1.0, 2.0])
    res["fit_sampling_steps"] = PS.linear_fit([5, 10], [1.5, 3.0])
    text = PS.format_scaling(res, "cmd", "machine", project_n=(10_000,), project_steps=(10,))
    assert "| 100 | 3.000 | 1.000 | 75.0% |" in text
    assert "| 10 | 3.000 | 0.3000 |" in text
    assert "| sampling vs samples | 0.0000 | 30.0000 ms per sample | 1.00000 |" in text
    # 10,000 samples × 10 steps: 3 ms per sample per step → 300 s; features 0.01 s per sample → 100 s
    assert "| 10,000 | 10 | 300 | 100 | 75.0% |" in text
    assert "autocast bf16, CUDA graph" in text and "random weights: timing only" in text


def test_format_quality_change_column():
    rows = [
        {"model": "ddpm_mnist", "seed_spread": 0.05, "solver": "ddim", "steps": 10, "spacing": "trailing",
         "metric": "FD-ResNet-20", "float32": 2.0, "autocast": 2.2, "rms_diff": 1e-3, "n": 1000},
        {"model": "fm_gmm2d", "solver": "dpmpp_2m", "steps": 50, "spacing": "uniform",
         "metric": "RMS error vs the exact gmm2d PF-ODE", "float32": 0.04, "autocast": 0.038, "rms_diff": 2.5e-2,
         "n": 2000},
    ]
    text = PS.format_quality(rows, "python -m bench.perf quality", "machine")
    lines = text.splitlines()
    assert "| model | solver | steps | metric | float32 | bf16 | change | seed spread | RMS diff | samples |" in lines
    assert "| ddpm_mnist | ddim | 10 | FD-ResNet-20 | 2 | 2.2 | +10.0% | 0.05 | 1.00e-03 | 1,000 |" in lines
    assert ("| fm_gmm2d | dpmpp_2m | 50 | RMS error vs the exact gmm2d PF-ODE | 0.04 | 0.038 | -5.0% | – | "
            "2.50e-02 | 2,000 |") in lines
    assert "under fp16 autocast" in PS.format_quality(rows, "c", "m", autocast="fp16")


# -- bench.gpu_check -------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: gpu_check would run its checks")
def test_gpu_check_refuses_without_cuda(capsys):
    from bench.studies import gpu_check

    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_scaling_needs_two_values_of_samples_and_steps(tmp_path):
    from bench.studies import perf
    with pytest.raises(SystemExit) as e:
        perf.main(["scaling", "--samples", "4", "--steps", "1,2", "--out", str(tmp_path / "s.md")])
    assert e.value.code == 2
    assert not (tmp_path / "s.md").exists()
