"""What the training scripts of the committed MNIST models share: the learning-rate schedule, the check of their
count options, the weight record, and writing the weight file with the digest to commit."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterable

import torch

from .checkpoints import file_digest
from .mnist_data import SPLIT_RULE
from .train_gmm2d import save_atomic

__all__ = ["lr_factor", "check_counts", "weight_record", "write_weights"]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning-rate multiplier at ``step``: a linear warm-up over ``warmup`` steps, then a cosine decay to 0
    at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(steps - warmup, 1), 1.0)))


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, keys: Iterable[str]) -> None:
    """``parser.error`` unless each option in ``keys`` is a positive integer (``warmup``: ≥ 0)."""
    for key in keys:
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")


def write_weights(record: dict, out: Path) -> None:
    """Write a weight record atomically and print what was written and the sha256 to commit."""
    save_atomic(record, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): {record['training']['summary']}")
    print(f"sha256 {file_digest(out, 'sha256')}: for the committed file, put it in WEIGHTS_SHA256 "
          "(pretrained/toy.py), or loading it fails the checksum")


def weight_record(fmt: str, arch: dict, net: torch.nn.Module, summary: str, settings: dict, final_loss: float,
                  command: str, **parts) -> dict:
    """The weight record of a network trained on the MNIST split: format, architecture (tuples as lists), any
    further ``parts`` (e.g. the boundary time, the autoencoder), the state dict, and how it was trained — the
    settings, the final loss, threads, torch version, data split and command, but no wall-clock time, so the
    same settings give the same bytes (and sha256)."""
    return {
        "format": fmt, "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}, **parts,
        "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "training": {"summary": summary, **settings, "final_loss": final_loss,
                     "threads": torch.get_num_threads(), "torch": str(torch.__version__), "data": SPLIT_RULE,
                     "command": command},
    }
