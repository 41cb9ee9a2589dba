"""Train ``cfg_mnist``: a class-conditional ε-prediction model of the 8,000 MNIST training images, with label
dropout for classifier-free guidance.

    python -m pretrained.train_cfg_mnist           # → pretrained/weights/cfg_mnist.pt (≈ 20 min on one CPU thread alone)

The network ε_θ(x_t, t, y) regresses ε on x_t = α(t)·x0 + σ(t)·ε of the cosine VP schedule
(:func:`pretrained.cfg_mnist.schedule`) with t ~ U(t_min, t_max), the schedule's range, ε ~ N(0, I), x0 a
training image in [−1, 1] and y its label (:func:`pretrained.mnist_data.mnist_split`), replaced by the null
label with probability ``p_uncond`` (0.1) so that one network is both the conditional and the unconditional
model.  Optimiser, learning-rate schedule, EMA, seeding and the atomic, timestamp-free record are those of
:mod:`pretrained.train_fm_mnist`: a rerun with the same settings, torch version and CPU on one thread writes
the same bytes; the sha256 printed at the end goes into :data:`pretrained.toy.WEIGHTS_SHA256`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import solvers

from .cfg_mnist import FORMAT, NUM_CLASSES, REBUILD, WEIGHTS_FILE, schedule
from .fm_mnist import FlowUNet
from .mnist_data import epoch_batches, mnist_split
from .training import check_counts, lr_factor, weight_record, write_weights

__all__ = ["train", "evaluate", "guided_images", "class_accuracy", "main", "DEFAULTS", "ARCH"]

DEFAULTS = dict(steps=3600, batch=64, lr=2e-3, warmup=200, ema=0.999, p_uncond=0.1, seed=0)
ARCH = dict(channels=(16, 32, 64), emb=128, n_freq=16, num_classes=NUM_CLASSES)


def train(*, steps: int, batch: int, lr: float, warmup: int, ema: float, p_uncond: float, seed: int,
          arch: Optional[dict] = None, log_every: int = 250,
          data: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict:
    """Train the conditional ε-network; returns the weight-file record (read by
    :func:`pretrained.cfg_mnist.read_cfg_mnist_weights`).

    Args:
        p_uncond: probability that a training label is replaced by the null label (``num_classes``).
        data: (images in [−1, 1] (N, 1, 28, 28), int64 labels (N,)) (default: the 8,000 training images).
    """
    arch = dict(ARCH if arch is None else arch)
    torch.manual_seed(seed)
    if data is None:
        images, labels = mnist_split("train")
        data = (images.float() / 127.5 - 1.0, labels)
    x_all, y_all = data
    sched_vp = schedule()
    net = FlowUNet(**arch).train()
    slow = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed + 1)
    order = epoch_batches(x_all.shape[0], batch, gen)
    t0, running, loss = time.perf_counter(), [], torch.tensor(float("nan"))
    for step in range(steps):
        index = next(order)
        x0, y = x_all[index], y_all[index]
        eps = torch.randn(x0.shape, generator=gen)
        t = sched_vp.t_min + (sched_vp.t_max - sched_vp.t_min) * torch.rand(x0.shape[0], generator=gen)
        y = torch.where(torch.rand(y.shape[0], generator=gen) < p_uncond, arch["num_classes"], y)
        x_t = sched_vp.q_sample(x0, t.double(), eps)
        loss = ((net(x_t, t, y) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        slow.update_parameters(net)
        running.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[cfg_mnist] step {step + 1}/{steps}  loss {sum(running) / len(running):.5f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            running = []
    settings = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, p_uncond=p_uncond, seed=seed)
    final = sum(running) / len(running) if running else float(loss.detach())
    print(f"[cfg_mnist] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return _record(slow.module, arch, settings, final, x_all.shape[0])


def _record(net: FlowUNet, arch: dict, settings: dict, final_loss: float, n_data: int) -> dict:
    s = settings
    summary = (f"class-conditional ε-prediction (x_t = α(t)·x0 + σ(t)·ε on the cosine VP schedule, t ~ U(t_min, "
               f"t_max), mean squared error on ε) on {n_data:,} labelled MNIST images in [−1, 1], label dropout "
               f"{s['p_uncond']} to the null label; U-Net channels {tuple(arch['channels'])} with a label "
               f"embedding, {sum(p.numel() for p in net.parameters()):,} parameters; {s['steps']} Adam steps "
               f"(lr {s['lr']}, {s['warmup']} warm-up steps, cosine decay), batch {s['batch']}, saved EMA "
               f"{s['ema']}, seed {s['seed']}")
    return weight_record(FORMAT, arch, net, summary, settings, final_loss, REBUILD)


def guided_images(model, labels: torch.Tensor, guidance: float, *, solver: str = "dpmpp_2m", steps: int = 20,
                  seed: int = 0) -> torch.Tensor:
    """Samples of the loaded ``cfg_mnist`` model conditioned on ``labels`` (one per sample) under guidance
    ``guidance``, as images in [0, 1] (N, 1, 28, 28); sample i starts from the noise of seed ``seed`` + i."""
    from .cfg_mnist import condition

    guided = condition(model, labels, guidance)
    x_T = solvers.initial_noise((labels.numel(), 1, 28, 28), seeds=[seed + i for i in range(labels.numel())],
                                schedule=guided.schedule)
    samples = solvers.sample(guided, x_T, solver=solver, steps=steps).samples
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` (N, 1, 28, 28) in [0, 1] that the committed MNIST classifier assigns to
    ``labels``."""
    from .mnist_classifier import load_mnist_classifier

    logits = load_mnist_classifier()(images)[1]
    return float((logits.argmax(dim=1) == labels).float().mean())


def evaluate(*, weights: Optional[Path] = None, n: int = 500, guidance: tuple = (1.0, 3.0), solver: str = "dpmpp_2m",
             steps: int = 20) -> dict:
    """The card's quality numbers: for each guidance w, the class accuracy (by the MNIST classifier) and the FD
    (MNIST classifier) against the 2,000 held-out images of n samples, n/10 per digit, and the noise floor (n
    held-out images against all 2,000).  Returns {"floor": (mean, sd), w: (accuracy, fd), …}."""
    from bench import datasets, features, metrics  # the metrics live in bench; bench imports pretrained

    from .cfg_mnist import load_cfg_mnist

    ext, layer, name = features.create_extractor("fd_mnist", "cpu")
    ref = datasets.reference_statistics("mnist-heldout", ext, layer, name, floor_n=n)
    model, labels = load_cfg_mnist(weights=weights), torch.arange(n) % NUM_CLASSES
    out = {"floor": tuple(ref["floor"])}
    for w in guidance:
        images = guided_images(model, labels, w, solver=solver, steps=steps)
        rgb = features.to_uint8_rgb(images)
        fd = metrics.get_metric("fd_mnist").value(features.extract_features(ext, layer, features.UInt8Images(rgb)),
                                                  ref)
        out[w] = (class_accuracy(images, labels), fd)
        print(f"guidance {w:g}: class accuracy {100 * out[w][0]:.1f} %, FD (MNIST classifier) {fd:.1f} "
              f"({n} samples, {solver} {steps} steps)", flush=True)
    print(f"noise floor ({n} held-out images against all 2,000): {out['floor'][0]:.1f} ± {out['floor'][1]:.1f}")
    return out


def main(argv: Optional[list] = None) -> int:
    """Command line: ``python -m pretrained.train_cfg_mnist [--steps N] [--p-uncond P] [--out PATH] …``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE, help=f"weight file (default {WEIGHTS_FILE})")
    for key in ("steps", "batch", "warmup", "seed"):
        parser.add_argument(f"--{key}", type=int, default=DEFAULTS[key])
    for key in ("lr", "ema", "p_uncond"):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, default=DEFAULTS[key])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible bytes, "
                        "and the machine is shared)")
    parser.add_argument("--evaluate", action="store_true", help="do not train: measure the committed weights (or "
                        "--weights PATH): class accuracy and FD (MNIST classifier) under guidance 1 and 3")
    parser.add_argument("--weights", type=Path, default=None, help="the weight file --evaluate measures")
    parser.add_argument("--num-samples", type=int, default=500, help="samples per guidance for --evaluate "
                        "(a multiple of 10: as many of each digit)")
    args = parser.parse_args(argv)
    if args.weights is not None and not args.evaluate:
        parser.error("--weights names the file --evaluate measures; to train, name the output with --out")
    if args.evaluate:
        if args.num_samples < 10 or args.num_samples % 10:
            parser.error(f"--num-samples must be a positive multiple of 10, got {args.num_samples}")
        torch.set_num_threads(args.threads)
        evaluate(weights=args.weights, n=args.num_samples)
        return 0
    check_counts(parser, args, ("steps", "batch", "warmup", "threads"))
    if not (0 < args.lr and 0 <= args.ema < 1):
        parser.error(f"--lr must be > 0 and --ema in [0, 1), got {args.lr} and {args.ema}")
    if not 0 < args.p_uncond < 1:
        parser.error(f"--p-uncond must be in (0, 1) (the null label must be trained, and so must the classes), "
                     f"got {args.p_uncond}")
    torch.set_num_threads(args.threads)
    record = train(**{k: getattr(args, k) for k in DEFAULTS})
    write_weights(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
