"""``mnist_classifier``: a small CNN trained by this project on the 8,000 MNIST training images.

It is the feature network of the ``fd_mnist`` metric (:mod:`bench.features`: Fréchet distance in its
128-d penultimate features, against the 2,000 held-out images it never saw) and the judge of
``class_accuracy``.  Trained by ``python -m pretrained.train_mnist_classifier`` (data split:
:mod:`pretrained.mnist_data`); the weight file ``pretrained/weights/mnist_classifier.pt`` holds the state
dict, the architecture, how it was trained and its held-out accuracy; it is read with ``weights_only=True``
and the committed file's sha256 is checked (:data:`pretrained.toy.WEIGHTS_SHA256`).

Input: grey images (B, 1, 28, 28) as floats in [0, 1] (0 = black background, MNIST's convention).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import read_network_record
from .toy import WEIGHTS_DIR, verify_committed_weights

__all__ = ["MnistClassifier", "FORMAT", "WEIGHTS_FILE", "FEATURES", "load_mnist_classifier", "read_classifier_record"]

FORMAT = "pretrained.mnist_classifier/1"
WEIGHTS_FILE = WEIGHTS_DIR / "mnist_classifier.pt"
FEATURES = 128


class MnistClassifier(nn.Module):
    """conv3×3(1→c1) → ReLU → max-pool → conv3×3(c1→c2) → ReLU → max-pool → linear(c2·7·7 → ``features``)
    → ReLU (the penultimate features) → dropout → linear(→ 10 logits).

    Args:
        c1, c2: convolution channels.
        features: width of the penultimate layer.
        dropout: dropout before the last layer (training only).
    """

    def __init__(self, c1: int = 32, c2: int = 64, features: int = FEATURES, dropout: float = 0.3):
        super().__init__()
        self.c1, self.c2, self.features, self.dropout = int(c1), int(c2), int(features), float(dropout)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 7 * 7, features)
        self.head = nn.Linear(features, 10)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The ``features``-d penultimate activations of images x (B, 1, 28, 28) in [0, 1]."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"the MNIST classifier takes grey 28×28 images (B, 1, 28, 28), got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(2.0 * x - 1.0)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features (B, features), logits (B, 10)) of images x (B, 1, 28, 28) in [0, 1]."""
        h = self.penultimate(x)
        return h, self.head(F.dropout(h, self.dropout, self.training))

    def arch(self) -> dict:
        """The constructor arguments (stored in weight files)."""
        return {"c1": self.c1, "c2": self.c2, "features": self.features, "dropout": self.dropout}


def read_classifier_record(path: os.PathLike) -> tuple[MnistClassifier, dict]:
    """Read a weight file written by ``train_mnist_classifier`` (weights-only) → (network in eval mode, record).

    Raises:
        CheckpointError: unreadable, another format, a bad architecture, missing/unexpected keys or shapes.
    """
    return read_network_record(path, fmt=FORMAT, what="the MNIST classifier weights",
                               rebuild="python -m pretrained.train_mnist_classifier",
                               build=lambda record: MnistClassifier(**dict(record["arch"])))


def load_mnist_classifier(weights: Optional[os.PathLike] = None, device: str = "cpu") -> MnistClassifier:
    """The trained classifier (eval mode, no gradients) from ``weights`` (default: the committed file, whose
    sha256 is checked).

    Raises:
        FileNotFoundError: no such file (the message says how to rebuild it).
        CheckpointError: a wrong checksum or not a classifier weight file.
    """
    path = Path(weights) if weights is not None else WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the committed MNIST classifier is {WEIGHTS_FILE} (rebuild "
                                "it with: python -m pretrained.train_mnist_classifier)")
    verify_committed_weights(path)
    net, _ = read_classifier_record(path)
    return net.requires_grad_(False).to(device)
