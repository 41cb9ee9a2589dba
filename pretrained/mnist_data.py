"""The MNIST data of the project's own MNIST models: the offline test set, split once and for all.

Only the 10,000-image MNIST *test* set is available offline (``mnist/`` in the assets folder,
:func:`pretrained.checkpoints.assets_dir`).  It is split by a fixed rule with no random numbers:

    **held out: every fifth image, test indices 4, 9, 14, …, 9999 (2,000 images); training: the other 8,000.**

Why interleaved rather than the first 8,000 / last 2,000: the first 5,000 test images were written by NIST
employees and are cleaner than the last 5,000 (students), so a contiguous split would hold out only the
harder half.  Every fifth image takes from both halves.  The classes come out balanced: each digit's share
of the held-out images is within 1.3 percentage points of its share of the whole test set (154 fives to
253 ones), and of the training images within 0.33 points.

The held-out images are the reference of ``fd_mnist`` and of every card trained here (``"mnist-heldout"`` in
:mod:`bench.datasets`); neither the classifier nor any model is trained on them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .checkpoints import assets_dir, assets_hint

__all__ = ["SPLIT_RULE", "N_TEST", "N_TRAIN", "N_HELDOUT", "split_indices", "mnist_split", "epoch_batches",
           "IMAGES_FILE", "LABELS_FILE"]

N_TEST, N_TRAIN, N_HELDOUT = 10_000, 8_000, 2_000
IMAGES_FILE, LABELS_FILE = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
SPLIT_RULE = ("MNIST test set (the only MNIST data offline) split by index: every fifth image (indices 4, 9, …, "
              "9999; 2,000) held out for reference statistics and accuracy, the other 8,000 used for training")


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(training indices (8000,), held-out indices (2000,)) into the MNIST test set, both increasing."""
    index = np.arange(N_TEST)
    held = index % 5 == 4
    return index[~held], index[held]


def _read(directory: Optional[os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    from bench.datasets import read_idx_images, read_idx_labels  # bench imports this module: no import circle

    folder = assets_dir() / "mnist" if directory is None else Path(directory)
    for name in (IMAGES_FILE, LABELS_FILE):
        if not (folder / name).is_file():
            where = assets_hint(f"mnist/{name}") if directory is None else f"looked for {folder / name}"
            raise FileNotFoundError(f"MNIST test set not found: {where}")
    images, labels = read_idx_images(folder / IMAGES_FILE), read_idx_labels(folder / LABELS_FILE)
    if images.shape != (N_TEST, 28, 28) or labels.shape != (N_TEST,):
        raise ValueError(f"{folder}: expected the 10,000 MNIST test images (28×28) and labels, got images "
                         f"{images.shape} and labels {labels.shape}")
    return images, labels


def mnist_split(part: str, directory: Optional[os.PathLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of the split: (uint8 images (N, 1, 28, 28), int64 labels (N,)).

    Args:
        part: ``"train"`` (8,000 images) or ``"heldout"`` (2,000).
        directory: the folder with the two IDX files (default ``mnist/`` in the assets folder, looked up at
            every call).

    Raises:
        ValueError: unknown part, or files that are not the MNIST test set.
        FileNotFoundError: the files are missing (the message says where they were looked for).
    """
    if part not in ("train", "heldout"):
        raise ValueError(f"unknown MNIST split part {part!r}; valid: 'train' (8,000 images), 'heldout' (2,000)")
    images, labels = _read(directory)
    index = split_indices()[0 if part == "train" else 1]
    return (torch.from_numpy(images[index].copy())[:, None],
            torch.from_numpy(labels[index].astype(np.int64)))


def epoch_batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches of size ``batch`` from ``range(n)`` for training: a fresh permutation (drawn from
    ``gen``) every epoch, each index once per epoch, the incomplete last batch of an epoch dropped.

    Raises:
        ValueError: ``batch`` is not in 1 … n.
    """
    if not 1 <= batch <= n:
        raise ValueError(f"batch size must be between 1 and the {n:,} training images, got {batch}")

    def endless() -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - batch + 1, batch):
                yield order[start:start + batch]

    return endless()
