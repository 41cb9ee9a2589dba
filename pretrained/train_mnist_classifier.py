"""Train ``mnist_classifier`` on the 8,000 MNIST training images and measure it on the 2,000 held-out ones.

    python -m pretrained.train_mnist_classifier      # → pretrained/weights/mnist_classifier.pt (a few CPU minutes)

Cross-entropy, Adam with a cosine decay, batches drawn without replacement epoch by epoch; each training
image is shifted by a random whole number of pixels in [−2, 2] along each axis (zero fill) — the only
augmentation.  Every random number comes from one seeded generator and the network runs on one CPU thread
by default, so a rerun with the same settings, torch version and CPU writes the same bytes.  The record
holds the held-out accuracy; the script refuses to write weights below 98 % held-out accuracy.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .mnist_classifier import FORMAT, WEIGHTS_FILE, MnistClassifier
from .mnist_data import SPLIT_RULE, epoch_batches, mnist_split
from .training import write_weights

__all__ = ["train", "accuracy", "random_shifts", "main", "DEFAULTS", "MIN_ACCURACY"]

DEFAULTS = dict(epochs=12, batch=64, lr=2e-3, shift=2, seed=0)
ARCH = dict(c1=32, c2=64, features=128, dropout=0.3)
MIN_ACCURACY = 0.98


def random_shifts(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of x (B, 1, H, W) moved by whole pixels (dy, dx) ∈ [−shift, shift]² (from ``gen``),
    zero-filled."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(net: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Fraction of ``images`` (uint8 (N, 1, 28, 28)) that ``net`` classifies as ``labels``."""
    net.eval()
    right = sum(int((net(images[i:i + batch].float() / 255.0)[1].argmax(1) == labels[i:i + batch]).sum())
                for i in range(0, len(images), batch))
    return right / len(images)


def train(*, epochs: int, batch: int, lr: float, shift: int, seed: int, log: bool = True) -> dict:
    """Train the classifier; returns the weight-file record (see
    :func:`pretrained.mnist_classifier.read_classifier_record`) with its held-out accuracy."""
    torch.manual_seed(seed)
    images, labels = mnist_split("train")
    x_all = images.float() / 255.0
    net = MnistClassifier(**ARCH).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(x_all) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed + 1)
    order, t0, loss = epoch_batches(len(x_all), batch, gen), time.perf_counter(), torch.tensor(float("nan"))
    for step in range(steps):
        index = next(order)
        net.train()
        loss = F.cross_entropy(net(random_shifts(x_all[index], shift, gen))[1], labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % (len(x_all) // batch) == 0:
            print(f"[mnist_classifier] epoch {(step + 1) * batch // len(x_all)}/{epochs}  loss {float(loss.detach()):.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    held_images, held_labels = mnist_split("heldout")
    settings = dict(epochs=epochs, batch=batch, lr=lr, shift=shift, seed=seed)
    return _record(net.eval(), settings, accuracy(net, images, labels), accuracy(net, held_images, held_labels))


def _record(net: MnistClassifier, settings: dict, train_acc: float, held_acc: float) -> dict:
    s = settings
    summary = (f"CNN (conv 32, conv 64, linear 128, linear 10; {sum(p.numel() for p in net.parameters()):,} "
               f"parameters) trained with cross-entropy on the 8,000 training images, random shifts of up to "
               f"±{s['shift']} pixels, {s['epochs']} epochs of Adam (lr {s['lr']}, cosine), batch {s['batch']}, seed "
               f"{s['seed']}; held-out accuracy {held_acc:.2%} (2,000 images), training accuracy {train_acc:.2%}")
    # No wall-clock time in the record: the same settings give the same bytes (and sha256).
    return {"format": FORMAT, "arch": dict(net.arch()),
            "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "training": {"summary": summary, **settings, "heldout_accuracy": held_acc, "train_accuracy": train_acc,
                         "threads": torch.get_num_threads(), "torch": str(torch.__version__), "data": SPLIT_RULE,
                         "command": "python -m pretrained.train_mnist_classifier"}}


def main(argv: Optional[list] = None) -> int:
    """Command line: ``python -m pretrained.train_mnist_classifier [--epochs N] [--out PATH] …``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE, help=f"weight file (default {WEIGHTS_FILE})")
    for key in ("epochs", "batch", "shift", "seed"):
        parser.add_argument(f"--{key}", type=int, default=DEFAULTS[key])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible bytes)")
    args = parser.parse_args(argv)
    for key in ("epochs", "batch", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if not 0 <= args.shift <= 8 or not args.lr > 0:
        parser.error(f"--shift must be 0…8 pixels and --lr > 0, got {args.shift} and {args.lr}")
    torch.set_num_threads(args.threads)
    record = train(**{k: getattr(args, k) for k in DEFAULTS})
    held = record["training"]["heldout_accuracy"]
    if held < MIN_ACCURACY:
        print(f"held-out accuracy {held:.2%} is below {MIN_ACCURACY:.0%}: nothing written", file=sys.stderr)
        return 1
    write_weights(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
