"""``fm_mnist``: a rectified-flow (flow-matching) velocity model of MNIST, trained by this project.

u_θ(x_t, t) ≈ E[ε − x0 | x_t] on the linear interpolant x_t = (1 − t)·x0 + t·ε (:class:`RectifiedFlow`,
``prediction="velocity"``), pixels in [−1, 1].  The network is a small U-Net (:class:`FlowUNet`, three
resolutions 28/14/7), trained on the 8,000 training images of :mod:`pretrained.mnist_data` by
``python -m pretrained.train_fm_mnist``; the 2,000 held-out images are its reference (``mnist-heldout``).
The weight file ``pretrained/weights/fm_mnist.pt`` holds the state dict (an EMA of the weights), the
architecture and how it was trained; it loads with ``weights_only=True`` and its sha256 is checked (:data:`pretrained.toy.WEIGHTS_SHA256`, the table of every committed file).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import solvers
from solvers.schedules import RectifiedFlow

from .cards import ModelCard, register_card
from .checkpoints import read_network_record
from .mnist_data import SPLIT_RULE
from .toy import WEIGHTS_DIR, WEIGHTS_SHA256, committed_weights, training_summary

__all__ = ["FlowUNet", "ResBlock", "groups", "FORMAT", "WEIGHTS_FILE", "read_fm_mnist_weights", "load_fm_mnist",
           "REBUILD"]

FORMAT = "pretrained.fm_mnist/1"
WEIGHTS_FILE = WEIGHTS_DIR / "fm_mnist.pt"
REBUILD = "python -m pretrained.train_fm_mnist"


def groups(c: int) -> int:
    """GroupNorm groups for c channels: 8 where they divide c, else 1."""
    return 8 if c % 8 == 0 else 1


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, plus a per-channel shift from the time embedding, twice; 1×1 skip."""

    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class FlowUNet(nn.Module):
    """A small U-Net F(x, t) for 1×28×28 images: one residual block per resolution (28, 14, 7) on the way
    down and up, a middle block at 7×7, skip connections by concatenation, and a time embedding (sinusoids
    of t at ``n_freq`` log-spaced frequencies from 1 to 1000, then a two-layer MLP) added in every block.

    With ``num_classes`` > 0 the network is class-conditional, F(x, t, y): a learned embedding of the label y
    (``num_classes`` rows, plus row ``num_classes`` for the null label ∅ of classifier-free guidance) is added
    to the time embedding.  With 0 (the default) the module, its state dict and :meth:`arch` are those of the
    unconditional network.

    Args:
        channels: channels at 28, 14 and 7 pixels.
        emb: width of the time embedding.
        n_freq: number of sinusoid frequencies.
        num_classes: number of classes of a class-conditional network (0: unconditional).
    """

    def __init__(self, channels: tuple = (32, 64, 64), emb: int = 128, n_freq: int = 16, num_classes: int = 0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {num_classes!r}")
        self.channels, self.emb_dim, self.n_freq = tuple(int(c) for c in channels), int(emb), int(n_freq)
        self.num_classes = num_classes
        c0, c1, c2 = self.channels
        self.register_buffer("freqs", torch.logspace(0, 3, n_freq), persistent=False)
        self.time = nn.Sequential(nn.Linear(2 * n_freq, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(1, c0, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(c0, c0, emb), ResBlock(c1, c1, emb), ResBlock(c2, c2, emb)])
        self.pool = nn.ModuleList([nn.Conv2d(c0, c1, 3, stride=2, padding=1), nn.Conv2d(c1, c2, 3, stride=2, padding=1)])
        self.mid = ResBlock(c2, c2, emb)
        self.up = nn.ModuleList([ResBlock(2 * c2, c2, emb), ResBlock(2 * c1, c1, emb), ResBlock(2 * c0, c0, emb)])
        self.unpool = nn.ModuleList([nn.Conv2d(c2, c1, 3, padding=1), nn.Conv2d(c1, c0, 3, padding=1)])
        self.out_norm, self.out = nn.GroupNorm(groups(c0), c0), nn.Conv2d(c0, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if num_classes:  # created last: the unconditional network's initial weights stay as they were
            self.label = nn.Embedding(num_classes + 1, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F(x, t) for x (B, 1, 28, 28) and t (B,) (or a scalar); a class-conditional network also takes
        ``labels`` (B,) in 0 … ``num_classes`` (``num_classes``: the null label).

        Raises:
            ValueError: labels missing for a class-conditional network, or given to an unconditional one.
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        phase = t * self.freqs.to(x.dtype)
        emb = self.time(torch.cat([torch.sin(phase), torch.cos(phase)], dim=1))
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"this FlowUNet has num_classes={self.num_classes}: labels are "
                             + ("required (one per row; the null label is num_classes)" if labels is None
                                else "not accepted (it is unconditional)"))
        if labels is not None:
            emb = emb + self.label(labels)
        h, skips = self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.unpool):
                h = self.unpool[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))

    def arch(self) -> dict:
        """The constructor arguments (stored in weight files)."""
        arch = {"channels": list(self.channels), "emb": self.emb_dim, "n_freq": self.n_freq}
        return {**arch, "num_classes": self.num_classes} if self.num_classes else arch


def read_fm_mnist_weights(path: os.PathLike) -> tuple[FlowUNet, dict]:
    """Read a weight file written by ``train_fm_mnist`` (weights-only) → (network in eval mode, record).

    Raises:
        CheckpointError: unreadable, another format, a bad architecture, missing/unexpected keys or shapes.
    """
    return read_network_record(path, fmt=FORMAT, what="the fm_mnist weights", rebuild=REBUILD,
                               build=lambda record: FlowUNet(**dict(record["arch"])))


def load_fm_mnist(*, device: str = "cpu", weights: Optional[os.PathLike] = None, dtype: Optional[torch.dtype] = None,
                  **model_kwargs) -> solvers.DiffusionModel:
    """The ``fm_mnist`` card's loader.

    Args:
        device: where the network runs.
        weights: a weight file (default: the committed ``pretrained/weights/fm_mnist.pt``, sha256-checked).
        dtype: dtype the network computes in (default float32).
        **model_kwargs: passed to :class:`solvers.DiffusionModel` (e.g. ``clip_x0``).

    Returns:
        A velocity-predicting ``DiffusionModel`` on :class:`RectifiedFlow`; data in [−1, 1].
    """
    path = committed_weights(weights, WEIGHTS_FILE, REBUILD)
    net, _ = read_fm_mnist_weights(path)
    net = net.requires_grad_(False).to(device=device, dtype=dtype or torch.float32)
    return solvers.DiffusionModel(net, schedule=RectifiedFlow(), prediction="velocity",
                                  input_dtype=dtype or torch.float32, **model_kwargs)


# Measured by this project on 2 shared CPU threads, with the command it names.
QUALITY = ("Quality, FD (MNIST classifier) of 500 samples against the 2,000 held-out images (python -m bench.run "
           "--model fm_mnist --solvers euler,heun,dpmpp_2m --steps 10,20,50 --num-samples 500): euler 66.9 / 50.9 / "
           "42.4 at 10 / 20 / 50 steps; heun 40.6 / 38.3 / 37.3 (NFE 19 / 39 / 99); dpmpp_2m 50.8 / 42.5 / 37.8. "
           "Noise floor (500 held-out images against all 2,000) 9.4 ± 1.7; four sets of 500 real training digits score 18.6-23.0, "
           "the level of a perfect model; so the best cells are ≈ 4× the floor, ≈ 2× real data: digits, some of "
           "them malformed.")


register_card(ModelCard(
    name="fm_mnist", kind="image",
    description="A rectified-flow (flow-matching) velocity model of MNIST trained by this project: a small U-Net "
                "on the linear interpolant, so velocity solvers run on a real image network.",
    loader=load_fm_mnist, sample_shape=(1, 28, 28), prediction="velocity",
    schedule_name="RectifiedFlow: x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1]; network time t",
    data_range=(-1.0, 1.0), to_images=lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), reference="mnist-heldout",
    default_num_samples=500, default_batch_size=250,
    # Trained here: the "source" is the training script, the weights are committed (sha256 in toy.WEIGHTS_SHA256).
    source_url="pretrained/train_fm_mnist.py (this project)", sha256=WEIGHTS_SHA256.get(WEIGHTS_FILE.name),
    licence="MIT (this project); trained on MNIST test images (Y. LeCun, C. Cortes)",
    weights_note=f"Trained by this project: {training_summary(WEIGHTS_FILE)}",
    notes=f"Data: {SPLIT_RULE}. Rebuild the weights with: {REBUILD} (30 min on one shared CPU thread). " + QUALITY,
    extra={"weights": WEIGHTS_FILE, "data_split": SPLIT_RULE},
))
