"""Train ``fm_mnist``: rectified flow / conditional flow matching on the 8,000 MNIST training images.

    python -m pretrained.train_fm_mnist            # → pretrained/weights/fm_mnist.pt (≈ 30 min, one shared CPU thread)

The velocity u_θ(x_t, t) regresses ε − x0 on x_t = (1 − t)·x0 + t·ε with t ~ U(0, 1), ε ~ N(0, I) and x0 a
training image (:func:`pretrained.mnist_data.mnist_split`, pixels x/127.5 − 1 in [−1, 1]), batches drawn
without replacement epoch by epoch.  Adam with a linear warm-up and a cosine decay; the saved weights are an
exponential moving average of θ.  Every random number comes from one seeded generator and the network
runs on one CPU thread by default, so a rerun with the same settings, torch version and CPU gives the same
bytes (another thread count or CPU may round differently).  The weights are written atomically with a
record of how they were trained; the sha256 printed at the end goes into
:data:`pretrained.toy.WEIGHTS_SHA256`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .fm_mnist import FORMAT, REBUILD, WEIGHTS_FILE, FlowUNet
from .mnist_data import epoch_batches, mnist_split
from .training import check_counts, lr_factor, weight_record, write_weights

__all__ = ["train", "main", "DEFAULTS", "ARCH"]

DEFAULTS = dict(steps=4500, batch=64, lr=2e-3, warmup=200, ema=0.999, seed=0)
ARCH = dict(channels=(16, 32, 64), emb=128, n_freq=16)



def train(*, steps: int, batch: int, lr: float, warmup: int, ema: float, seed: int, arch: Optional[dict] = None,
          log_every: int = 250, data: Optional[torch.Tensor] = None) -> dict:
    """Train the velocity network; returns the weight-file record (see :func:`pretrained.fm_mnist.read_fm_mnist_weights`).

    Args:
        data: training images in [−1, 1], (N, 1, 28, 28) (default: the 8,000 training images).
    """
    arch = dict(ARCH if arch is None else arch)
    torch.manual_seed(seed)
    x_all = mnist_split("train")[0].float() / 127.5 - 1.0 if data is None else data
    net = FlowUNet(**arch).train()
    slow = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed + 1)
    order = epoch_batches(x_all.shape[0], batch, gen)
    t0, running, loss = time.perf_counter(), [], torch.tensor(float("nan"))
    for step in range(steps):
        x0 = x_all[next(order)]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.rand(x0.shape[0], generator=gen)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        loss = ((net(x_t, t) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        slow.update_parameters(net)
        running.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[fm_mnist] step {step + 1}/{steps}  loss {sum(running) / len(running):.5f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            running = []
    settings = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, seed=seed)
    final = sum(running) / len(running) if running else float(loss.detach())
    print(f"[fm_mnist] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return _record(slow.module, arch, settings, final, x_all.shape[0])


def _record(net: FlowUNet, arch: dict, settings: dict, final_loss: float, n_data: int) -> dict:
    s = settings
    summary = (f"rectified flow / conditional flow matching (x_t = (1 − t)·x0 + t·ε, t ~ U(0, 1), target ε − x0, "
               f"mean squared error) on {n_data:,} MNIST images in [−1, 1]; U-Net channels "
               f"{tuple(arch['channels'])}, {sum(p.numel() for p in net.parameters()):,} parameters; {s['steps']} "
               f"Adam steps (lr {s['lr']}, {s['warmup']} warm-up steps, cosine decay), batch {s['batch']}, saved "
               f"EMA {s['ema']}, seed {s['seed']}")
    return weight_record(FORMAT, arch, net, summary, settings, final_loss, REBUILD)


def main(argv: Optional[list] = None) -> int:
    """Command line: ``python -m pretrained.train_fm_mnist [--steps N] [--out PATH] …``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE, help=f"weight file (default {WEIGHTS_FILE})")
    for key in ("steps", "batch", "warmup", "seed"):
        parser.add_argument(f"--{key}", type=int, default=DEFAULTS[key])
    for key in ("lr", "ema"):
        parser.add_argument(f"--{key}", type=float, default=DEFAULTS[key])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible bytes, "
                        "and the machine is shared)")
    args = parser.parse_args(argv)
    check_counts(parser, args, ("steps", "batch", "warmup", "threads"))
    if not (0 < args.lr and 0 <= args.ema < 1):
        parser.error(f"--lr must be > 0 and --ema in [0, 1), got {args.lr} and {args.ema}")
    torch.set_num_threads(args.threads)
    record = train(**{k: getattr(args, k) for k in DEFAULTS})
    write_weights(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
