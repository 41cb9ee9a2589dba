"""Train the small learned models of ``gmm2d``: ``cm_gmm2d`` and ``fm_gmm2d`` (a few CPU minutes each).

    python -m pretrained.train_gmm2d cm      # consistency distillation from the exact PF-ODE  → weights/cm_gmm2d.pt
    python -m pretrained.train_gmm2d fm      # rectified flow / conditional flow matching       → weights/fm_gmm2d.pt

**cm** — consistency distillation (Song et al. 2023, Algorithm 2) with the exact ``gmm2d`` denoiser as the
teacher: σ levels σ_1 < … < σ_N on the Karras grid (ρ = 7) from 0.002 to 80; per example a level n, data
x0 ~ gmm2d, x_{n+1} = x0 + σ_{n+1}·z, and the teacher's one Heun step of the exact probability-flow ODE
dx/dσ = (x − D(x, σ))/σ from σ_{n+1} to σ_n gives x̂_n; the loss is ‖f_θ(x_{n+1}, σ_{n+1}) − f_θ⁻(x̂_n, σ_n)‖²
with θ⁻ an EMA of θ (the paper's target network).  The saved weights are a slower EMA of θ.

**fm** — the velocity u_θ(x_t, t) regresses ε − x0 on x_t = (1 − t)·x0 + t·ε, t ~ U(0, 1).

Both draw fresh exact samples every step (the data distribution is known), run on one thread, and write the
weights atomically with a record of how they were trained.
"""
from __future__ import annotations

import argparse
import copy
import io
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .checkpoints import file_digest
from .files import atomic_write_bytes
from .toy import FORMAT, WEIGHTS_DIR, build_network, teacher_mixture, teacher_schedule

__all__ = ["train", "karras_levels", "main"]

DEFAULTS = {
    "cm": dict(steps=12_000, batch=1024, lr=1e-3, levels=40, target_ema=0.95, ema=0.999, seed=0),
    "fm": dict(steps=12_000, batch=1024, lr=2e-3, levels=0, target_ema=0.0, ema=0.999, seed=0),
}
ARCH = dict(dim=2, hidden=128, depth=4, n_freq=6)


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n increasing noise levels from σ_min to σ_max on the Karras grid (float64)."""
    u = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + u * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p, alpha=1.0 - decay)


def train(kind: str, *, steps: int, batch: int, lr: float, levels: int, target_ema: float, ema: float,
          seed: int, log_every: int = 1000) -> dict:
    """Train one toy model; returns the weight-file record (see :func:`pretrained.toy.read_toy_weights`)."""
    torch.manual_seed(seed)
    mixture = teacher_mixture()
    schedule = teacher_schedule(kind)
    sigma_data = math.sqrt(float(torch.trace(mixture.covariance())) / mixture.dim)
    net = build_network(kind, ARCH, sigma_data).train()
    slow = copy.deepcopy(net).eval()             # the saved weights: an EMA of θ
    target = copy.deepcopy(net).eval() if kind == "cm" else None   # θ⁻ of consistency distillation
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    sigmas = karras_levels(levels, schedule.sigma_min, schedule.sigma_max) if kind == "cm" else None
    gen = torch.Generator().manual_seed(seed + 1)
    t0, running = time.perf_counter(), []
    for step in range(steps):
        x0 = mixture.sample(batch, seed=seed * 1_000_003 + step)
        z = torch.randn(batch, mixture.dim, generator=gen, dtype=torch.float64)
        if kind == "cm":
            pred, goal = _distillation_pair(net, target, mixture, sigmas, x0, z, gen)
        else:
            pred, goal = _flow_matching_pair(net, x0, z, gen)
        loss = ((pred - goal) ** 2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if target is not None:
            _ema_update(target, net, target_ema)
        _ema_update(slow, net, ema)
        running.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[{kind}] step {step + 1}/{steps}  loss {sum(running) / len(running):.5f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            running = []
    seconds = time.perf_counter() - t0
    final_loss = sum(running) / len(running) if running else float(loss.detach())
    settings = dict(steps=steps, batch=batch, lr=lr, levels=levels, target_ema=target_ema, ema=ema, seed=seed)
    return _record(kind, slow, sigma_data, settings, final_loss, seconds)


def _distillation_pair(net, target, mixture, sigmas: torch.Tensor, x0: torch.Tensor, z: torch.Tensor,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, goal) of one consistency-distillation step: f_θ(x_{n+1}, σ_{n+1}) and f_θ⁻(x̂_n, σ_n), where
    x̂_n is the teacher's Heun step from x_{n+1} = x0 + σ_{n+1}·z at a random level n (drawn from ``gen``)."""
    n = torch.randint(0, len(sigmas) - 1, (x0.shape[0],), generator=gen)
    s_hi, s_lo = sigmas[n + 1], sigmas[n]
    x_hi = x0 + s_hi[:, None] * z
    # The teacher: one Heun step of the exact PF-ODE dx/dσ = (x − D(x, σ))/σ from σ_{n+1} to σ_n.
    d_hi = (x_hi - mixture.denoise(x_hi, 1.0, s_hi)) / s_hi[:, None]
    x_eu = x_hi + (s_lo - s_hi)[:, None] * d_hi
    d_lo = (x_eu - mixture.denoise(x_eu, 1.0, s_lo)) / s_lo[:, None]
    x_lo = x_hi + (s_lo - s_hi)[:, None] * 0.5 * (d_hi + d_lo)
    with torch.no_grad():
        goal = target(x_lo.float(), s_lo.float())
    return net(x_hi.float(), s_hi.float()), goal


def _flow_matching_pair(net, x0: torch.Tensor, z: torch.Tensor, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, goal) of one flow-matching step: u_θ(x_t, t) and ε − x0 on x_t = (1 − t)·x0 + t·ε, with
    t ~ U(0, 1) drawn from ``gen``."""
    t = torch.rand(x0.shape[0], generator=gen, dtype=torch.float64)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * z
    goal = (z - x0).float()
    return net(x_t.float(), t.float()), goal


def _record(kind: str, slow: torch.nn.Module, sigma_data: float, settings: dict, final_loss: float,
            seconds: float) -> dict:
    """The weight-file record: the saved EMA weights with a description of how they were trained."""
    s = settings
    if kind == "cm":
        summary = (f"consistency distillation from the exact gmm2d PF-ODE (one Heun step of the exact denoiser "
                   f"between {s['levels']} Karras levels σ ∈ [0.002, 80], ρ = 7), L2 loss, target EMA "
                   f"{s['target_ema']}, {s['steps']} Adam steps (lr {s['lr']}, cosine), batch {s['batch']}, "
                   f"saved EMA {s['ema']}, seed {s['seed']}")
    else:
        summary = (f"rectified flow / conditional flow matching on exact gmm2d samples (t ~ U(0, 1), target ε − x0), "
                   f"{s['steps']} Adam steps (lr {s['lr']}, cosine), batch {s['batch']}, saved EMA {s['ema']}, "
                   f"seed {s['seed']}")
    return {
        "format": FORMAT, "kind": kind, "arch": dict(ARCH), "sigma_data": sigma_data,
        "state_dict": {k: v.detach().clone() for k, v in slow.state_dict().items()},
        "training": {"summary": summary, **settings, "final_loss": final_loss,
                     "seconds": seconds, "threads": torch.get_num_threads(), "torch": str(torch.__version__),
                     "command": f"python -m pretrained.train_gmm2d {kind}"},
    }


def save_atomic(record: dict, path: Path) -> None:
    """Write ``record`` with torch.save, atomically (:func:`pretrained.files.atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(record, buf)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: Optional[list] = None) -> int:
    """Command line: ``python -m pretrained.train_gmm2d {cm,fm} [--steps N] [--out PATH] …``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("cm", "fm"))
    parser.add_argument("--out", type=Path, default=None, help="weight file (default pretrained/weights/KIND_gmm2d.pt)")
    for key in ("steps", "batch", "levels", "seed"):
        parser.add_argument(f"--{key}", type=int, default=None)
    for key in ("lr", "target_ema", "ema"):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = dict(DEFAULTS[args.kind])
    options.update({k: v for k, v in vars(args).items() if k in options and v is not None})
    record = train(args.kind, **options)
    out = args.out or WEIGHTS_DIR / f"{args.kind}_gmm2d.pt"
    save_atomic(record, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) in {record['training']['seconds']:.0f} s: "
          f"{record['training']['summary']}")
    print(f"sha256 {file_digest(out, 'sha256')}: for a file in pretrained/weights/, put it in WEIGHTS_SHA256 "
          f"(pretrained/toy.py), or loading it fails the checksum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
