"""``cfg_mnist``: a class-conditional ε-prediction model of MNIST for classifier-free guidance, trained here.

ε_θ(x_t, t, y) ≈ E[ε | x_t, y] on the cosine variance-preserving schedule (:func:`schedule`), pixels in
[−1, 1].  The network is :class:`pretrained.fm_mnist.FlowUNet` with a label embedding (``num_classes=10``;
label 10 is the null label ∅), trained with label dropout on the 8,000 training images of
:mod:`pretrained.mnist_data` by ``python -m pretrained.train_cfg_mnist``; the 2,000 held-out images are its
reference (``mnist-heldout``).

Why the cosine schedule: on 28×28 images the linear VP schedule reaches near-pure noise early and spends a
large share of its time range on levels where little of the digit is left (Nichol & Dhariwal 2021, §3.2);
the cosine schedule spreads the noise levels more evenly, which is what a small network trained for a few
thousand steps benefits from.

The loader returns the unconditional (null-label) model; the card's ``condition(model, labels, guidance)``
(:func:`condition`) turns it into the class-conditional model under classifier-free guidance.  The weight file
``pretrained/weights/cfg_mnist.pt`` holds the state dict (an EMA), the architecture and how it was trained; it
loads with ``weights_only=True`` and its sha256 is checked (:data:`pretrained.toy.WEIGHTS_SHA256`).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

import solvers
from solvers.model import classifier_free_guidance
from solvers.schedules import VPCosine

from .cards import ModelCard, register_card
from .checkpoints import CheckpointError, read_network_record
from .fm_mnist import FlowUNet
from .mnist_data import SPLIT_RULE
from .toy import WEIGHTS_DIR, WEIGHTS_SHA256, committed_weights, training_summary

__all__ = ["FORMAT", "WEIGHTS_FILE", "REBUILD", "NUM_CLASSES", "CLIP_X0", "schedule", "read_cfg_mnist_weights",
           "load_cfg_mnist", "condition"]

FORMAT = "pretrained.cfg_mnist/1"
WEIGHTS_FILE = WEIGHTS_DIR / "cfg_mnist.pt"
REBUILD = "python -m pretrained.train_cfg_mnist"
NUM_CLASSES = 10
# The loaded model clamps its x0 prediction to the data range by default.  An ε-prediction's x0 = (x − σ·ε̂)/α
# multiplies the network's error by 1/α, 119 at t_max (α = 0.0084): on held-out digits at t_max the x0
# prediction's mean squared error is ≈ 33 (the data's variance is 0.23), and unclamped samplers carry that
# error into the digit: dpmpp_2m, 20 steps, 500 samples scored FD (MNIST classifier) ≈ 1,000 and a class
# accuracy of 27 % under guidance 1.  Clamped, as Ho et al.'s DDPM sampler does, see QUALITY.
CLIP_X0 = (-1.0, 1.0)


def schedule() -> VPCosine:
    """The schedule the network was trained on: the cosine VP schedule with its defaults (network time t)."""
    return VPCosine()


def read_cfg_mnist_weights(path: os.PathLike) -> tuple[FlowUNet, dict]:
    """Read a weight file written by ``train_cfg_mnist`` (weights-only) → (network in eval mode, record).

    Raises:
        CheckpointError: unreadable, another format, a bad or unconditional architecture, missing/unexpected
            keys or shapes.
    """
    def build(record: dict) -> FlowUNet:
        arch = dict(record["arch"])
        if arch.get("num_classes") != NUM_CLASSES:
            raise CheckpointError(f"{path}: the cfg_mnist network has num_classes={NUM_CLASSES}, this file's "
                                  f"architecture says {arch.get('num_classes')!r} (rebuild it with: {REBUILD})")
        return FlowUNet(**arch)

    return read_network_record(path, fmt=FORMAT, what="the cfg_mnist weights", rebuild=REBUILD, build=build)


class _Labelled:
    """``fn(x, t) = net(x, t, labels)``: the network with fixed labels (None: the null label for every row)."""

    def __init__(self, net: FlowUNet, labels: Optional[torch.Tensor] = None):
        self.net, self.labels = net, labels

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = self.labels
        if labels is None:
            labels = torch.full((x.shape[0],), self.net.num_classes, dtype=torch.long, device=x.device)
        elif labels.shape[0] != x.shape[0]:
            raise ValueError(f"cfg_mnist: {labels.shape[0]} labels were given for a batch of {x.shape[0]} "
                             "samples; condition the model with one label per sample")
        return self.net(x, t, labels)


def load_cfg_mnist(*, device: str = "cpu", weights: Optional[os.PathLike] = None,
                   dtype: Optional[torch.dtype] = None, clip_x0: Optional[tuple] = CLIP_X0,
                   **model_kwargs) -> solvers.DiffusionModel:
    """The ``cfg_mnist`` card's loader: the unconditional (null-label) model; :func:`condition` conditions it.

    Args:
        device: where the network runs.
        weights: a weight file (default: the committed ``pretrained/weights/cfg_mnist.pt``, sha256-checked).
        dtype: dtype the network computes in (default float32).
        clip_x0: clamp the predicted x0 to this range (default (−1, 1), the data range, as DDPM samplers do;
            see :data:`CLIP_X0` for why this model needs it); None turns it off.
        **model_kwargs: passed to :class:`solvers.DiffusionModel` (e.g. ``dynamic_threshold``).

    Returns:
        An ε-predicting ``DiffusionModel`` on :func:`schedule`; data in [−1, 1].
    """
    path = committed_weights(weights, WEIGHTS_FILE, REBUILD)
    net, _ = read_cfg_mnist_weights(path)
    net = net.requires_grad_(False).to(device=device, dtype=dtype or torch.float32)
    return solvers.DiffusionModel(_Labelled(net), schedule=schedule(), prediction="eps", clip_x0=clip_x0,
                                  input_dtype=dtype or torch.float32, **model_kwargs)


def _check_labels(labels) -> torch.Tensor:
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"cfg_mnist: labels must be a 1-D tensor of integers in 0 … {NUM_CLASSES - 1}, got "
                         f"{type(labels).__name__}") from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"cfg_mnist: labels must be integers (a LongTensor), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"cfg_mnist: labels must be a non-empty 1-D tensor (one label per sample), got shape "
                         f"{tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise ValueError(f"cfg_mnist: labels must be digits 0 … {NUM_CLASSES - 1}, got {bad[0].item()} (the "
                         "unconditional model is guidance 0, or the model as loaded)")
    return labels.long()


def condition(model: solvers.DiffusionModel, labels, guidance: float) -> solvers.DiffusionModel:
    """The card's ``condition``: ``model`` (as the loader returns it) conditioned on ``labels`` under
    classifier-free guidance ε_∅ + w·(ε_y − ε_∅), w = ``guidance``.

    w = 1 evaluates the conditional network alone (one row per sample), w = 0 the null label alone; any other
    w makes one batched call on [x; x] with labels [y; ∅] (``rows_per_sample`` 2).

    Args:
        model: a model returned by :func:`load_cfg_mnist` (its schedule and options are kept).
        labels: one digit 0 … 9 per sample of the batch the model will be called on (integer tensor).
        guidance: the scale w ≥ 0.

    Raises:
        ValueError: labels that are not a 1-D integer tensor of digits, a negative or non-finite guidance,
            or a model that is not the cfg_mnist network.
    """
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ValueError(f"cfg_mnist: guidance must be a finite number >= 0 (1: the conditional model, 0: the "
                         f"unconditional one), got {guidance!r}")
    if not isinstance(getattr(model, "fn", None), _Labelled):
        raise ValueError("cfg_mnist: condition needs the model that pretrained.load('cfg_mnist') returns, got "
                         f"{model!r}")
    net, w = model.fn.net, float(guidance)
    labels = _check_labels(labels).to(next(net.parameters()).device)
    if w == 1.0:
        fn = _Labelled(net, labels)
    elif w == 0.0:
        fn = _Labelled(net)
    else:
        fn = classifier_free_guidance(net, labels, torch.full_like(labels, NUM_CLASSES), w)
    return solvers.DiffusionModel(fn, schedule=model.schedule, prediction=model.prediction, clip_x0=model.clip_x0,
                                  dynamic_threshold=model.dynamic_threshold, input_dtype=model.input_dtype)


# Measured by this project on 2 shared CPU threads, with the commands it names (x0 clamped, the loader's default).
QUALITY = ("Quality under guidance, 500 samples (50 of each digit), dpmpp_2m 20 logSNR steps (python -m "
           "pretrained.train_cfg_mnist --evaluate): class accuracy by the MNIST classifier 67.4 % at guidance 1 "
           "and 98.8 % at guidance 3; FD (MNIST classifier) against the 2,000 held-out images 137.1 and 59.4. "
           "Unconditional (the model as loaded), FD of 500 samples (python -m bench.run --model cfg_mnist --solvers "
           "ddim,dpmpp_2m --steps 10,20 --num-samples 500): ddim 281.6 / 258.6 at 10 / 20 steps, dpmpp_2m 257.5 / "
           "252.3. Noise floor (500 held-out images against all 2,000) 9.4 ± 1.7; 500 real training digits score "
           "18.6-23.0. So guidance 3 draws the digit asked for almost always, at ≈ 6× the floor (≈ 3× real data); "
           "the conditional model alone (guidance 1) draws malformed digits, a third of them read as another "
           "digit; the unconditional model (trained on the 10 % of null labels) is poor.")


register_card(ModelCard(
    name="cfg_mnist", kind="image",
    description="A class-conditional ε-prediction model of MNIST trained by this project with label dropout, "
                "so one network gives the conditional and the unconditional model: classifier-free guidance "
                "on a real image network.",
    loader=load_cfg_mnist, sample_shape=(1, 28, 28), prediction="eps",
    schedule_name="VPCosine(s=0.008): x_t = α(t)·x0 + σ(t)·ε, t ∈ [1e-5, 0.9946]; network time t",
    data_range=(-1.0, 1.0), to_images=lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), reference="mnist-heldout",
    default_num_samples=500, default_batch_size=250,
    source_url="pretrained/train_cfg_mnist.py (this project)", sha256=WEIGHTS_SHA256.get(WEIGHTS_FILE.name),
    licence="MIT (this project); trained on MNIST test images (Y. LeCun, C. Cortes)",
    weights_note=f"Trained by this project: {training_summary(WEIGHTS_FILE)}",
    notes=f"Data: {SPLIT_RULE}. Rebuild the weights with: {REBUILD} (20 min on one CPU thread alone, 34 on the shared machine). The model as "
          "loaded is the unconditional one (null label). " + QUALITY,
    extra={"weights": WEIGHTS_FILE, "data_split": SPLIT_RULE},
    num_classes=NUM_CLASSES, condition=condition, default_guidance=(1.0, 3.0),
))
