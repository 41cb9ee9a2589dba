"""``ddpm_mnist``: a small third-party DDPM on MNIST (ε-prediction, 293K parameters).

The weights are ``contents_all/ddpm_mnist.pth`` of GitHub ``sdaloglu/diffusion_with_entropy`` (MIT), a copy
of which lies in ``../shared/assets/ddpm_mnist/`` (its README describes the network and the convention).

Convention of the authors (their notebook ``DDPM.ipynb``): ᾱ_i = ``alpha_t[i]`` for i = 0 … 1000 with
β_i = 1e-4 + (0.02 − 1e-4)·i/1000, x_i = √ᾱ_i·x_0 + √(1 − ᾱ_i)·ε, the network sees i/1000, training draws
i from 1 … 999, and the sampler runs x_{i−1} = (x_i − β_i/√(1 − ᾱ_i)·ε_θ(x_i, i/1000))/√(1 − β_i) + √β_i·z
for i = 1000 … 1 (no noise at i = 1).  Pixels are x/255 − 0.5, in [−0.5, 0.5].

Here solver time j = i − 1 (j = 0 … 999) on a :class:`DiscreteVP` with ``alphas_cumprod = alpha_t[1:]``, and
the network's time input is (j + 1)/1000 = i/1000 exactly.  So every 1000-step grid of the discrete spacings
(and ``uniform``) is the authors' 1000 … 1, the step to ``t_zero`` is DDPM's final step to ᾱ = 1, and the
network is never evaluated at the untrained index 0.  ``solver="ddpm", variance="large"`` is the authors'
update for i = 1000 … 2; their last step returns the posterior mean at ᾱ_0 = 1 − 1e-4 where ours returns
the x0 prediction (a difference of order √(1 − ᾱ_1) ≈ 0.015 in pixel units of [−0.5, 0.5]).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import solvers
from solvers.schedules import DiscreteVP

from .cards import ModelCard, register_card
from .checkpoints import CheckpointError, WeightsSource, check_state_dict, read_state_dict, \
    resolve_weights

__all__ = ["MnistEpsNet", "MnistDiscreteVP", "SOURCE", "load_ddpm_mnist"]

COMMIT = "6d0b2c70ad36df39ba2c4111375e0e06ce77ed17"
SOURCE = WeightsSource(
    filename="ddpm_mnist.pth",
    url=f"https://raw.githubusercontent.com/sdaloglu/diffusion_with_entropy/{COMMIT}/contents_all/ddpm_mnist.pth",
    # From ../shared/assets/README.md, which lists the sha256 of the copy taken from that commit.
    sha256="1995214f56c5bb6f37204e38d9f239227ce13a2c64734c27441fbf04defc6e6a",
    env_var="DDPM_MNIST_WEIGHTS",
    asset="ddpm_mnist/ddpm_mnist.pth",
    description="the ddpm_mnist checkpoint",
)
T = 1000
CHANNELS = (16, 32, 32, 16)
SIZE = 28


def _expected_shapes() -> dict[str, tuple]:
    shapes = {"beta_t": (T + 1,), "alpha_t": (T + 1,), "gt.frequencies": (16,)}
    c_in = 1
    for b, c in enumerate(CHANNELS):
        shapes[f"gt.blocks.{b}.net.0.weight"] = (c, c_in, 7, 7)
        shapes[f"gt.blocks.{b}.net.0.bias"] = (c,)
        shapes[f"gt.blocks.{b}.net.1.weight"] = (c, SIZE, SIZE)
        shapes[f"gt.blocks.{b}.net.1.bias"] = (c, SIZE, SIZE)
        c_in = c
    shapes["gt.blocks.4.weight"] = (1, CHANNELS[-1], 3, 3)
    shapes["gt.blocks.4.bias"] = (1,)
    for i, (n_in, n_out) in zip((0, 2, 4, 6), ((32, 128), (128, 128), (128, 128), (128, CHANNELS[0]))):
        shapes[f"gt.time_embed.{i}.weight"] = (n_out, n_in)
        shapes[f"gt.time_embed.{i}.bias"] = (n_out,)
    return shapes


class MnistEpsNet(torch.nn.Module):
    """The authors' CNN ε_θ(x, t) (README of the asset; their class ``CNN``), as plain tensor operations.

    Four blocks Conv7×7 → LayerNorm(C, 28, 28) → GELU (1→16→32→32→16 channels), the time embedding added
    after the first block, and a final Conv3×3 16→1.  Time embedding: concat(sin(t·f), cos(t·f) − 1) with
    f = [0, 2π·1.5^k], then an MLP 32→128→128→128→16 with GELUs.  Input t is i/1000.

    Args:
        state_dict: the checkpoint's ``gt.*`` tensors (keys without the ``gt.`` prefix).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in state_dict.items():
            self.register_buffer(key.replace(".", "_"), value.detach().clone())

    def _w(self, key: str) -> torch.Tensor:
        return getattr(self, key.replace(".", "_"))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times in [0, 1] → (B, 16)."""
        phase = t.to(self.frequencies.dtype)[:, None] * self.frequencies[None, :]
        h = torch.cat([torch.sin(phase), torch.cos(phase) - 1.0], dim=1)
        for i in (0, 2, 4):
            h = F.gelu(F.linear(h, self._w(f"time_embed.{i}.weight"), self._w(f"time_embed.{i}.bias")))
        return F.linear(h, self._w("time_embed.6.weight"), self._w("time_embed.6.bias"))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(x, t): x (B, 1, 28, 28) in the [−0.5, 0.5] pixel scale, t (B,) = i/1000."""
        h = x
        for b in range(len(CHANNELS)):
            h = F.conv2d(h, self._w(f"blocks.{b}.net.0.weight"), self._w(f"blocks.{b}.net.0.bias"), padding=3)
            h = F.layer_norm(h, h.shape[1:], self._w(f"blocks.{b}.net.1.weight"), self._w(f"blocks.{b}.net.1.bias"))
            h = F.gelu(h)
            if b == 0:
                h = h + self.time_embedding(t)[:, :, None, None].to(h.dtype)
        return F.conv2d(h, self._w("blocks.4.weight"), self._w("blocks.4.bias"), padding=1)


class MnistDiscreteVP(DiscreteVP):
    """The authors' schedule with solver time j = i − 1: ᾱ(j) = ``alpha_t[j + 1]``, network input (j + 1)/1000.

    The shift is done on the host in float64, so the network sees exactly the authors' i/1000.
    """

    name = "discrete_vp_mnist"

    def __init__(self, alpha_t: torch.Tensor):
        super().__init__(alphas_cumprod=torch.as_tensor(alpha_t, dtype=torch.float64)[1:], time_scale=1.0 / T)

    def model_time(self, t):
        return (torch.as_tensor(t, dtype=torch.float64) + 1.0) / T

    def describe(self):
        return "authors' ᾱ_i = alpha_t[i], solver time j = i − 1, network time i/1000 (N=1000)"


def load_ddpm_mnist(*, device: str = "cpu", weights: Optional[os.PathLike] = None, dtype: Optional[torch.dtype] = None,
                    download: Optional[bool] = None, verify: bool = True, cache: Optional[os.PathLike] = None,
                    **model_kwargs) -> solvers.DiffusionModel:
    """The ``ddpm_mnist`` card's loader.

    Args:
        device: where the network runs.
        weights: path of ``ddpm_mnist.pth`` (default: ``$DDPM_MNIST_WEIGHTS``, the shared assets, the cache,
            a download from the authors' repository).
        dtype: dtype the network computes in (default float32).
        download, verify, cache: see :func:`pretrained.checkpoints.resolve_weights`.
        **model_kwargs: passed to :class:`solvers.DiffusionModel` (``clip_x0``, ``dynamic_threshold``).

    Returns:
        A ``DiffusionModel`` (ε-prediction) on :class:`MnistDiscreteVP`; data in [−0.5, 0.5].
    """
    expected = _expected_shapes()

    def check(path: Path) -> None:
        check_state_dict(read_state_dict(path, what=SOURCE.description), expected, path=path,
                         what=SOURCE.description)

    path = resolve_weights(SOURCE, weights, cache=cache, download=download, verify=verify, check=check)
    sd = read_state_dict(path, what=SOURCE.description)
    check_state_dict(sd, expected, path=path, what=SOURCE.description)
    abar = sd["alpha_t"].to(torch.float64)
    if not bool((abar[1:] < abar[:-1]).all()) or not bool(((abar > 0) & (abar < 1)).all()):
        raise CheckpointError(f"{path}: alpha_t must be strictly decreasing values in (0, 1)")
    net = MnistEpsNet({k[3:]: v for k, v in sd.items() if k.startswith("gt.")})
    net = net.to(device=device, dtype=dtype or torch.float32).eval()
    return solvers.DiffusionModel(net, schedule=MnistDiscreteVP(abar), prediction="eps",
                                  input_dtype=dtype, **model_kwargs)


register_card(ModelCard(
    name="ddpm_mnist", kind="image",
    description="A small third-party DDPM on MNIST (293K parameters, ε-prediction, linear β over 1000 steps): "
                "the offline real network of the benchmark. A modest model — its authors report FID ≈ 50 with "
                "their own set-up.",
    loader=load_ddpm_mnist, sample_shape=(1, 28, 28), prediction="eps",
    schedule_name="DiscreteVP: the authors' linear β 1e-4…0.02, T = 1000, ᾱ from the checkpoint; solver time "
                  "j = i − 1, network time i/1000",
    data_range=(-0.5, 0.5), to_images=lambda x: (x + 0.5).clamp(0.0, 1.0), reference="mnist-test",
    # 300 samples: the full `--solvers ddim,dpmpp,heun,ddpm --steps 1,10,50,1000` sweep costs 5,301 model
    # calls per sample, ≈ 25 min of network time on 2 CPU cores at 0.94 ms per sample-call.
    default_num_samples=300, default_batch_size=300,
    default_solver_options={"ddpm": {"variance": "large"}},
    source_url=f"https://github.com/sdaloglu/diffusion_with_entropy/blob/{COMMIT}/contents_all/ddpm_mnist.pth",
    sha256=SOURCE.sha256, licence="MIT (sdaloglu/diffusion_with_entropy; ../shared/assets/ddpm_mnist/LICENSE)",
    weights_note="The authors' trained ε-network (one checkpoint; no EMA variant is published).",
    published={"FID (authors' own set-up, not comparable to CIFAR FIDs)":
               (50.0, "../shared/assets/ddpm_mnist/README.md, quoting the authors (≈ 50)")},
    notes="Weights: weights=PATH, $DDPM_MNIST_WEIGHTS, $DIFFUSION_SOLVERS_ASSETS/ddpm_mnist/ (default "
          "../shared/assets/ddpm_mnist/ beside the checkout), the cache, or a download from the authors' "
          "repository (sha256-verified). The authors' sampler is solver='ddpm', "
          "variance='large', 1000 steps (any discrete spacing): identical for i = 1000…2; see "
          "pretrained/ddpm_mnist.py for the last step. Trained on i = 1…999 only.",
    extra={"weights_source": SOURCE,
           # 291,217 trained parameters; 293,235 with the checkpoint's schedule buffers (the "293K").
           "parameters": 291_217},
))
