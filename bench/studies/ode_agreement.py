"""Do the deterministic samplers converge to the same probability-flow ODE solution?

    python -m bench.ode_agreement --model ddpm_mnist --num-samples 16

From the same seeds, runs each (solver, steps, spacing) below and prints the RMS difference (over all
coordinates) of its samples to those of the reference (DPM-Solver++, 1000 steps, log-SNR grid).  Agreement of
very different solvers at high step counts shows that what remains of their quality gap to the data is the
model's ODE, not solver error.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

import pretrained
import solvers

RUNS = (("dpmpp", 1000, "logsnr"), ("ddim", 1000, "trailing"), ("heun", 500, "karras"),
        ("ddim", 50, "trailing"), ("ddim", 10, "trailing"), ("dpmpp", 10, "logsnr"))


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m bench.ode_agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ddpm_mnist", help="zoo model (default ddpm_mnist)")
    p.add_argument("--num-samples", type=int, default=16, help="samples (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error("--num-samples must be positive")
    torch.set_num_threads(args.threads)
    card = pretrained.get_card(args.model)
    model = pretrained.load(args.model)
    seeds = list(range(args.num_samples))
    x_T = solvers.initial_noise((args.num_samples, *card.sample_shape), seeds, schedule=model.schedule)
    ref = None
    print(f"{args.model}, {args.num_samples} samples; RMS difference to dpmpp × 1000 (logsnr)")
    for name, steps, spacing in RUNS:
        res = solvers.sample(model, x_T, name, steps, spacing=spacing, seeds=seeds)
        ref = res.samples if ref is None else ref
        rms = ((res.samples - ref) ** 2).mean().sqrt().item()
        print(f"  {name:6s} {steps:5d} steps ({spacing:8s}) NFE {res.nfe:5d}: RMS {rms:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
