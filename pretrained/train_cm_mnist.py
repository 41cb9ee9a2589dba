"""Train ``cm_mnist``: consistency distillation of ``fm_mnist`` on the 8,000 MNIST training images.

    python -m pretrained.train_cm_mnist            # → pretrained/weights/cm_mnist.pt (≈ 25 min, one CPU thread)

Song et al. 2023, Algorithm 2, on the teacher's probability-flow ODE dx/dt = v(x, t) (rectified flow,
x_t = (1 − t)·x0 + t·ε).  Each step: a batch of training images x0 (:func:`pretrained.mnist_data.mnist_split`,
pixels x/127.5 − 1, drawn without replacement epoch by epoch) and noise ε; n uniform in {0, …, N − 1} on the
grid t_n = t_min + n·(1 − t_min)/N; x_{n+1} = (1 − t_{n+1})·x0 + t_{n+1}·ε; one Heun step of the teacher's
ODE from t_{n+1} to t_n gives x̂_n; the loss is ‖f_θ(x_{n+1}, t_{n+1}) − f_θ⁻(x̂_n, t_n)‖² (mean squared error,
λ(t_n) = 1; LPIPS, Song et al.'s best metric, is not available offline, so this is their L2 variant), with
θ⁻ the target network, an EMA of θ with rate μ (``target_ema``).  The grid is uniform in t rather than
Karras-style because the sampler's grid on rectified flow is uniform in t (so its points ½, ¼, ¾ are
training points) and the rectified-flow ODE has no stiff end near t = 0 that would call for smaller steps
there.  The student θ starts from the teacher's weights (f is then the teacher's one-step Euler x0
prediction).  Adam with a linear warm-up and then a constant rate (as Song et al.); the saved weights are a
second, slower EMA of θ (``ema``).

Every random number comes from one seeded generator and the networks run on one CPU thread by default, so a
rerun with the same settings, torch version, CPU and teacher file gives the same bytes.  The weights are
written atomically with a record of how they were trained; the sha256 printed at the end goes into
:data:`pretrained.toy.WEIGHTS_SHA256`.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import fm_mnist
from .checkpoints import file_digest
from .cm_mnist import FORMAT, REBUILD, T_MIN, WEIGHTS_FILE, FlowConsistency
from .fm_mnist import FlowUNet
from .mnist_data import epoch_batches, mnist_split
from .toy import verify_committed_weights
from .training import check_counts, weight_record, write_weights

__all__ = ["train", "main", "DEFAULTS", "load_teacher", "heun_step"]

DEFAULTS = dict(steps=3000, batch=32, intervals=16, lr=2e-4, warmup=100, target_ema=0.95, ema=0.995, seed=0)


def load_teacher() -> FlowUNet:
    """The committed ``fm_mnist`` velocity network (sha256-checked), frozen, in eval mode."""
    verify_committed_weights(fm_mnist.WEIGHTS_FILE)
    net, _ = fm_mnist.read_fm_mnist_weights(fm_mnist.WEIGHTS_FILE)
    return net.requires_grad_(False).eval()


@torch.no_grad()
def heun_step(velocity: torch.nn.Module, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """One Heun step of dx/dt = velocity(x, t) from ``t_from`` to ``t_to`` (both (B,))."""
    h = (t_to - t_from)[:, None, None, None]
    d_cur = velocity(x, t_from)
    # Euler step, then the trapezoidal correction.
    x_euler = x + h * d_cur
    return x + h * 0.5 * (d_cur + velocity(x_euler, t_to))


def train(*, steps: int, batch: int, intervals: int, lr: float, warmup: int, target_ema: float, ema: float,
          seed: int, teacher: Optional[FlowUNet] = None, log_every: int = 100,
          data: Optional[torch.Tensor] = None) -> dict:
    """Distil the consistency function; returns the weight-file record (see
    :func:`pretrained.cm_mnist.read_cm_mnist_weights`).

    Args:
        intervals: N, the number of intervals of the discretisation of [t_min, 1].
        teacher: the velocity network (default: the committed ``fm_mnist``, :func:`load_teacher`).
        data: training images in [−1, 1], (M, 1, 28, 28) (default: the 8,000 training images).
    """
    torch.manual_seed(seed)
    teacher_given = teacher is not None
    teacher = load_teacher() if teacher is None else teacher.requires_grad_(False).eval()
    x_all = mnist_split("train")[0].float() / 127.5 - 1.0 if data is None else data
    student = FlowConsistency(copy.deepcopy(teacher).requires_grad_(True).train())
    target = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(target_ema))
    slow = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema))
    target.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    gen = torch.Generator().manual_seed(seed + 1)
    order = epoch_batches(x_all.shape[0], batch, gen)
    t0, running, loss = time.perf_counter(), [], torch.tensor(float("nan"))
    for step in range(steps):
        x0 = x_all[next(order)]
        eps = torch.randn(x0.shape, generator=gen)
        n = torch.randint(0, intervals, (x0.shape[0],), generator=gen)
        t_next, t_cur = (T_MIN + (n + 1) * (1 - T_MIN) / intervals), (T_MIN + n * (1 - T_MIN) / intervals)
        x_next = (1 - t_next)[:, None, None, None] * x0 + t_next[:, None, None, None] * eps
        x_hat = heun_step(teacher, x_next, t_next, t_cur)
        with torch.no_grad():
            f_target = target(x_hat, t_cur)
        loss = ((student(x_next, t_next) - f_target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        target.update_parameters(student)
        slow.update_parameters(student)
        running.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[cm_mnist] step {step + 1}/{steps}  loss {sum(running) / len(running):.6f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            running = []
    settings = dict(steps=steps, batch=batch, intervals=intervals, lr=lr, warmup=warmup, target_ema=target_ema,
                    ema=ema, seed=seed)
    final = sum(running) / len(running) if running else float(loss.detach())
    print(f"[cm_mnist] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return _record(slow.module.network, settings, final, x_all.shape[0], teacher_given=teacher_given)


def _record(net: FlowUNet, settings: dict, final_loss: float, n_data: int, teacher_given: bool) -> dict:
    s = settings
    teacher = "a given teacher" if teacher_given else f"fm_mnist (sha256 {file_digest(fm_mnist.WEIGHTS_FILE)[:16]}…)"
    summary = (f"consistency distillation (Song et al. 2023, Algorithm 2) of {teacher} on its rectified-flow ODE: "
               f"f(x, t) = x − (t − {T_MIN:g})·F(x, t), F a U-Net with channels {tuple(net.channels)}, "
               f"{sum(p.numel() for p in net.parameters()):,} parameters, initialised from the teacher; N = "
               f"{s['intervals']} intervals uniform in t, one Heun step of the teacher per pair, squared L2 loss "
               f"(no LPIPS), target EMA μ = {s['target_ema']}; {n_data:,} MNIST images in [−1, 1]; {s['steps']} "
               f"Adam steps (lr {s['lr']}, {s['warmup']} warm-up steps, then constant), batch {s['batch']}, "
               f"saved EMA {s['ema']}, seed {s['seed']}")
    return weight_record(FORMAT, net.arch(), net, summary, settings, final_loss, REBUILD, t_min=T_MIN)


def main(argv: Optional[list] = None) -> int:
    """Command line: ``python -m pretrained.train_cm_mnist [--steps N] [--out PATH] …``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE, help=f"weight file (default {WEIGHTS_FILE})")
    for key in ("steps", "batch", "intervals", "warmup", "seed"):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=DEFAULTS[key])
    for key in ("lr", "target_ema", "ema"):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, default=DEFAULTS[key])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible bytes, "
                        "and the machine is shared)")
    args = parser.parse_args(argv)
    check_counts(parser, args, ("steps", "batch", "intervals", "warmup", "threads"))
    if not (args.lr > 0 and 0 <= args.target_ema < 1 and 0 <= args.ema < 1):
        parser.error(f"--lr must be > 0 and --target-ema, --ema in [0, 1), got {args.lr}, {args.target_ema} "
                     f"and {args.ema}")
    torch.set_num_threads(args.threads)
    record = train(**{k: getattr(args, k) for k in DEFAULTS})
    write_weights(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
