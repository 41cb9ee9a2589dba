"""``ddpm_mnist``: the port of the authors' network and sampler, checked against their description and code.

Needs the offline assets ddpm_mnist/ (weights) and, for the data checks, mnist/ ($DIFFUSION_SOLVERS_ASSETS, else
../shared/assets; see conftest.py); each test skips with the path it looked at when its asset is absent.  The
authors' sampler (their notebook ``DDPM.ipynb``, also quoted in the asset README) is written out literally
below and compared with ``solver="ddpm"``.
"""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

import pretrained
import solvers
from pretrained.checkpoints import ASSETS
from pretrained.ddpm_mnist import SOURCE, MnistEpsNet
from solvers.noise import STREAM_SOLVER, SeedStreams

WEIGHTS = ASSETS / "ddpm_mnist" / "ddpm_mnist.pth"
MNIST_IMAGES = ASSETS / "mnist" / "t10k-images-idx3-ubyte.gz"

pytestmark = pytest.mark.assets("ddpm_mnist/ddpm_mnist.pth")  # see conftest.py: the project's assets lookup


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return pretrained.load("ddpm_mnist")


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def test_checkpoint_is_the_one_the_readme_describes(checkpoint):
    # README: β_i = 1e-4 + (0.02 − 1e-4)·i/1000, ᾱ = cumprod(1 − β), frequencies [0, 2π·1.5^k].
    i = torch.arange(1001, dtype=torch.float64)
    torch.testing.assert_close(checkpoint["beta_t"].double(), 1e-4 + (0.02 - 1e-4) * i / 1000, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(checkpoint["alpha_t"].double(), torch.cumprod(1 - checkpoint["beta_t"].double(), 0),
                               rtol=1e-5, atol=0)
    freqs = torch.tensor([0.0] + [2 * math.pi * 1.5 ** k for k in range(15)])
    torch.testing.assert_close(checkpoint["gt.frequencies"], freqs.float())
    n = sum(v.numel() for k, v in checkpoint.items() if k.startswith("gt.") and k != "gt.frequencies")
    assert n == pretrained.get_card("ddpm_mnist").extra["parameters"] == 291_217
    assert n + 2 * 1001 + 16 == 293_235   # the README's "293K" counts the schedule buffers too


def test_schedule_and_time_input_are_the_authors(model, checkpoint):
    sched = model.schedule
    # Solver time j = i − 1: ᾱ(j) = alpha_t[i], network input i/1000, exactly.
    j = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha(j) ** 2, checkpoint["alpha_t"][1:].double(), rtol=1e-12, atol=0)
    assert torch.equal(sched.model_time(j).float(), ((j + 1) / 1000).float())
    assert sched.t_max == 999 and float(sched.alpha(sched.t_zero)) == 1.0
    # Every 1000-step grid of the discrete spacings is the authors' i = 1000 … 1, then the step to ᾱ = 1.
    want = [float(v) for v in range(999, -1, -1)] + [-1.0]
    for spacing in ("uniform", "trailing", "linspace", "leading"):
        assert solvers.make_grid(sched, 1000, spacing=spacing) == want, spacing


def _authors_loop(net, z, seeds, i_from: int, i_to: int, checkpoint):
    """Their sampler, literally, for i = i_from … i_to + 1 (noise from our per-sample solver streams)."""
    beta, alpha = checkpoint["beta_t"], checkpoint["alpha_t"]
    streams = SeedStreams(seeds, STREAM_SOLVER)
    one = torch.ones(z.shape[0])
    z = z.clone()
    with torch.no_grad():
        for i in range(i_from, i_to, -1):
            z -= (beta[i] / torch.sqrt(1 - alpha[i])) * net(z, (i / 1000) * one)
            z /= torch.sqrt(1 - beta[i])
            if i > 1:
                z += torch.sqrt(beta[i]) * streams.randn(z.shape[1:])
    return z


@pytest.mark.parametrize("i_from,i_to", [(1000, 990), (12, 1)])
def test_ddpm_large_variance_is_the_authors_sampler(i_from, i_to, model, checkpoint):
    seeds = [3, 4, 5]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 28, 28, generator=g) if i_from == 1000 else 0.3 * torch.randn(3, 1, 28, 28, generator=g)
    grid = [float(i - 1) for i in range(i_from, i_to - 1, -1)]   # solver time j = i − 1
    ours = solvers.sample(model, z, solver="ddpm", steps=None, timesteps=grid, seeds=seeds, variance="large")
    theirs = _authors_loop(model.fn, z, seeds, i_from, i_to, checkpoint)
    # Equal up to float32 rounding (β is recovered from the ratio of stored ᾱ's, to ~1e-3 relative at small i).
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=2e-4)


def test_last_step_returns_the_x0_prediction(model, checkpoint):
    # Grid [j = 0, t_zero]: our final step is x0 = (x − √(1−ᾱ_1)·ε̂)/√ᾱ_1; the authors' is the posterior mean at
    # ᾱ_0 = 1 − 1e-4 (the module docstring): the two differ by O(√(1 − ᾱ_1)) ≈ 0.015.
    x = 0.3 * torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ours = solvers.sample(model, x, solver="ddpm", steps=None, timesteps=[0.0, -1.0], variance="large").samples
    abar1 = float(checkpoint["alpha_t"][1])
    with torch.no_grad():
        eps = model.fn(x, torch.full((2,), 0.001))
    torch.testing.assert_close(ours, (x - math.sqrt(1 - abar1) * eps) / math.sqrt(abar1), rtol=1e-5, atol=1e-5)
    theirs = _authors_loop(model.fn, x, [0, 1], 1, 0, checkpoint)
    assert 0 < float((ours - theirs).abs().max()) < 0.05


def _mnist_test_images(n: int) -> torch.Tensor:
    raw = gzip.decompress(MNIST_IMAGES.read_bytes())
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    return torch.from_numpy(images.astype(np.float32) / 255.0 - 0.5)   # the authors' x/255 − 0.5


@pytest.mark.assets("mnist/t10k-images-idx3-ubyte.gz")
@pytest.mark.parametrize("i", [50, 300, 600, 900])
def test_the_network_denoises_real_test_digits(i, model):
    # Predicting ε ~ N(0, I) with zeros scores MSE 1; a trained network on its own training distribution
    # must do much better at every noise level.
    x0 = _mnist_test_images(64)
    g = torch.Generator().manual_seed(i)
    eps = torch.randn(x0.shape, generator=g)
    j = float(i - 1)
    x_t = model.schedule.q_sample(x0, j, eps)
    with torch.no_grad():
        pred = model.fn(x_t, torch.full((64,), float(model.schedule.model_time(j))))
    assert float(((pred - eps) ** 2).mean()) < 0.2


def test_samples_have_the_ink_of_mnist_digits(model):
    # 50 DDIM steps from noise; MNIST's mean intensity is 0.13 and most pixels are background.
    x_T = solvers.initial_noise((16, 1, 28, 28), seeds=range(16), schedule=model.schedule)
    img = pretrained.get_card("ddpm_mnist").to_images(
        solvers.sample(model, x_T, solver="ddim", steps=50, spacing="trailing").samples)
    mean_ink = float(img.mean())
    background = float((img < 0.1).float().mean())
    assert 0.05 < mean_ink < 0.3 and background > 0.6
    noise_img = pretrained.get_card("ddpm_mnist").to_images(x_T)
    assert float((noise_img < 0.1).float().mean()) < 0.5   # which pure noise is not


def test_wrong_file_fails_with_the_sha256(tmp_path, checkpoint):
    altered = dict(checkpoint)
    altered["gt.blocks.4.bias"] = altered["gt.blocks.4.bias"] + 1
    path = tmp_path / "ddpm_mnist.pth"
    torch.save(altered, path)
    with pytest.raises(pretrained.CheckpointError, match="sha256") as e:
        pretrained.load("ddpm_mnist", weights=path)
    assert str(path) in str(e.value) and SOURCE.sha256 in str(e.value)
    assert pretrained.load("ddpm_mnist", weights=path, verify=False) is not None
    del altered["gt.time_embed.6.bias"]
    torch.save(altered, path)
    with pytest.raises(pretrained.CheckpointError, match=r"missing keys: gt\.time_embed\.6\.bias"):
        pretrained.load("ddpm_mnist", weights=path, verify=False)


def test_environment_variable_points_at_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_MNIST_WEIGHTS", str(tmp_path / "nothing.pth"))
    with pytest.raises(pretrained.WeightsNotFoundError, match="DDPM_MNIST_WEIGHTS"):
        pretrained.load("ddpm_mnist")
    monkeypatch.setenv("DDPM_MNIST_WEIGHTS", str(WEIGHTS))
    assert isinstance(pretrained.load("ddpm_mnist").fn, MnistEpsNet)


@pytest.mark.benchmark(group="ddpm_mnist")
def test_forward_time_at_batch_250(benchmark, model):
    x = torch.randn(250, 1, 28, 28)
    t = torch.full((250,), 0.5)

    def forward():
        with torch.no_grad():
            return model.fn(x, t)

    assert benchmark(forward).shape == x.shape
