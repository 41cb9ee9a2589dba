"""``cm_mnist``: a consistency model of MNIST, distilled by this project from ``fm_mnist``.

Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, Algorithm 2) of the rectified-flow teacher
:mod:`pretrained.fm_mnist` along its own probability-flow ODE, x_t = (1 − t)·x0 + t·ε, dx/dt = v(x, t).
The consistency function is

    f(x, t) = x − (t − t_min)·F(x, t),   t_min = 0,

with F a :class:`pretrained.fm_mnist.FlowUNet`.  Why this form: c_skip = 1 and c_out = −(t − t_min) give the
boundary condition f(x, t_min) = x exactly, and with F = the teacher's velocity f is the teacher's one-step
Euler x0 prediction x − t·v, so the student starts from the teacher's weights at a sensible function.  Why
t_min = 0: on rectified flow the ODE is regular at the data end (α(0) = 1, the velocity stays bounded), unlike
EDM/VE where σ → 0 degenerates the network's input scaling and Song et al. stop at ε = 0.002; so f maps
straight to x0, and the multistep sampler's re-noising x = (1 − t)·x0 + t·z is the forward process itself
(``sigma_boundary = 0``).

The solvers see f as an x0-predicting :class:`solvers.DiffusionModel` on :class:`RectifiedFlow`; sample it
with ``solver="consistency"``.  The harness's grid for it on rectified flow is uniform in t ending at σ = 0
([1, 0], [1, ½, 0], [1, ¾, ½, ¼, 0]): one step is x0 = f(ε, 1); k steps are Song et al.'s multistep sampler
(Algorithm 1) at τ = the grid's interior points.  The weight file ``pretrained/weights/cm_mnist.pt`` (written by
``python -m pretrained.train_cm_mnist``) holds F's state dict (an EMA of the student), its architecture and the
training record; it loads with ``weights_only=True`` and its sha256 is checked
(:data:`pretrained.toy.WEIGHTS_SHA256`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

import solvers
from solvers.schedules import RectifiedFlow

from .cards import ModelCard, register_card
from .checkpoints import CheckpointError, read_network_record
from .fm_mnist import FlowUNet
from .mnist_data import SPLIT_RULE
from .toy import WEIGHTS_DIR, WEIGHTS_SHA256, committed_weights, training_summary

__all__ = ["T_MIN", "FlowConsistency", "FORMAT", "WEIGHTS_FILE", "REBUILD", "read_cm_mnist_weights",
           "load_cm_mnist"]

FORMAT = "pretrained.cm_mnist/1"
WEIGHTS_FILE = WEIGHTS_DIR / "cm_mnist.pt"
REBUILD = "python -m pretrained.train_cm_mnist"
T_MIN = 0.0  # the boundary time: f(x, T_MIN) = x


class FlowConsistency(nn.Module):
    """The consistency function f(x, t) = x − (t − t_min)·F(x, t) around a network F (a :class:`FlowUNet`).

    Args:
        network: ``network(x, t) -> tensor`` of x's shape.
        t_min: the boundary time, where f(x, t_min) = x.
    """

    def __init__(self, network: nn.Module, t_min: float = T_MIN):
        super().__init__()
        self.network, self.t_min = network, float(t_min)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) for x (B, 1, 28, 28) and t (B,) (or a scalar)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return x - (t - self.t_min).view(-1, *([1] * (x.dim() - 1))) * self.network(x, t)


def read_cm_mnist_weights(path: os.PathLike) -> tuple[FlowConsistency, dict]:
    """Read a weight file written by ``train_cm_mnist`` (weights-only) → (consistency function in eval mode,
    record).

    Raises:
        CheckpointError: unreadable, another format, a bad architecture, missing/unexpected keys or shapes,
            another boundary time t_min.
    """
    net, record = read_network_record(path, fmt=FORMAT, what="the cm_mnist weights", rebuild=REBUILD,
                                      build=lambda record: FlowUNet(**dict(record["arch"])))
    if record.get("t_min") != T_MIN:   # another boundary would be another function f: never reinterpret it
        raise CheckpointError(f"{path}: t_min = {record.get('t_min')!r} in the file, but cm_mnist's consistency "
                              f"function has its boundary at t_min = {T_MIN} (written by {REBUILD})")
    return FlowConsistency(net, T_MIN).eval(), record


def load_cm_mnist(*, device: str = "cpu", weights: Optional[os.PathLike] = None, dtype: Optional[torch.dtype] = None,
                  **model_kwargs) -> solvers.DiffusionModel:
    """The ``cm_mnist`` card's loader.

    Args:
        device: where the network runs.
        weights: a weight file (default: the committed ``pretrained/weights/cm_mnist.pt``, sha256-checked).
        dtype: dtype the network computes in (default float32).
        **model_kwargs: passed to :class:`solvers.DiffusionModel` (e.g. ``clip_x0``).

    Returns:
        An x0-predicting ``DiffusionModel`` (the consistency function) on :class:`RectifiedFlow`; data in
        [−1, 1].  Sample it with ``solver="consistency"`` (``sigma_boundary=0``, the default).
    """
    path = committed_weights(weights, WEIGHTS_FILE, REBUILD)
    fn, _ = read_cm_mnist_weights(path)
    fn = fn.requires_grad_(False).to(device=device, dtype=dtype or torch.float32)
    return solvers.DiffusionModel(fn, schedule=RectifiedFlow(), prediction="x0",
                                  input_dtype=dtype or torch.float32, **model_kwargs)


# Measured by this project on shared CPU threads, with the commands it names (the same 500 seeds in every cell).
QUALITY = ("Quality, FD (MNIST classifier) of 500 samples against the 2,000 held-out images (python -m bench.run "
           "--model cm_mnist --solvers consistency --steps 1,2,4 --num-samples 500): 93.6 / 69.2 / 53.8 at 1 / 2 / 4 "
           "steps (= model calls). The teacher at the same calls (python -m bench.run --model fm_mnist --solvers "
           "euler,heun,dpmpp_2m --steps 1,2,4 --num-samples 500): 1 call 1407 (euler; heun's 1 step is euler), "
           "1411 (dpmpp_2m); 2 calls 581 (euler), 586 (dpmpp_2m); 4 calls 165 (euler), 126 (dpmpp_2m); heun "
           "needs 3 calls for 2 steps (320) and 7 for 4 (58.2). The teacher's own ceiling is its ODE: heun 20 "
           "steps 38.3 (fm_mnist's card). Noise floor (500 held-out images against all 2,000) 9.4 ± 1.7; real "
           "training digits score 18.6-23.0: 4 steps ≈ 5.7× the floor, recognisable digits, some malformed; "
           "1 step is grainier.")


register_card(ModelCard(
    name="cm_mnist", kind="image",
    description="A consistency model of MNIST distilled by this project from fm_mnist (consistency distillation "
                "on the teacher's rectified-flow ODE): one- and few-step generation with solver='consistency'.",
    loader=load_cm_mnist, sample_shape=(1, 28, 28), prediction="x0",
    schedule_name="RectifiedFlow: x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1]; network time t; f(x, t) = x − t·F(x, t)",
    data_range=(-1.0, 1.0), to_images=lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), reference="mnist-heldout",
    default_num_samples=500, default_batch_size=250,
    # The solver re-noises x0 = f(x, τ) as if it had noise σ_b in x0 units: t_min/(1 − t_min) (0 here).
    default_solver_options={"consistency": {"sigma_boundary": T_MIN / (1.0 - T_MIN)}},
    # Trained here: the "source" is the training script, the weights are committed (sha256 in toy.WEIGHTS_SHA256).
    source_url="pretrained/train_cm_mnist.py (this project)", sha256=WEIGHTS_SHA256.get(WEIGHTS_FILE.name),
    licence="MIT (this project); trained on MNIST test images (Y. LeCun, C. Cortes)",
    weights_note=f"Distilled by this project: {training_summary(WEIGHTS_FILE)}",
    notes=f"Data: {SPLIT_RULE}. Teacher: fm_mnist. Rebuild the weights with: {REBUILD} (≈ 15 min on one CPU "
          "thread alone, 27 min on the shared machine; the committed fm_mnist weights are the teacher). Only solver='consistency' is meaningful: the network is a consistency "
          "function, not a denoiser. " + QUALITY,
    extra={"weights": WEIGHTS_FILE, "data_split": SPLIT_RULE, "teacher": "fm_mnist", "t_min": T_MIN,
           "solvers": ("consistency",)},
))
