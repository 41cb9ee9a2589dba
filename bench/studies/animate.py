"""The noise-trajectory animation: the forward process dissolves data into noise, the solver rebuilds it.

    python -m bench.animate --model gmm2d --solver dpmpp --steps 50
    python -m bench.animate --model ddpm_mnist --solver ddim --steps 50 --num-samples 8

writes ``OUT.gif`` (animated) and ``OUT.html`` (a page showing it, with the command that made it); OUT defaults
to ``runs/animation_MODEL`` (the committed copies in ``reports/`` are refreshed only with an explicit
``--out reports/animation_MODEL``).  Each frame
shows the solver time t and ᾱ_t = α(t)² (the signal fraction; for non-VP schedules α and σ are shown).
2-D models are drawn as point clouds, image models as a strip of images.
"""
from __future__ import annotations

import argparse
import html
import shlex
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import pretrained
import solvers
from bench.results import atomic_write_bytes
from pretrained.files import atomic_path


def _label(schedule, t: float, phase: str) -> str:
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    if schedule.variance_preserving:
        return f"{phase}   t = {t:.4g}   ᾱ_t = {a * a:.4f}"
    return f"{phase}   t = {t:.4g}   α = {a:.3f}   σ = {s:.3f}"


def trajectory(model_name: str, solver: str, steps: int, num_samples: int, seed: int = 0,
               forward_frames: Optional[int] = None, data: Optional[torch.Tensor] = None,
               **solver_options) -> tuple[list[np.ndarray], list[str], object]:
    """Frames of the forward process (data → noise) followed by the solver's reverse trajectory.

    Args:
        model_name: a zoo model; its card's ``data_sampler`` (or ``data``) gives the data to dissolve.
        solver, steps: the reverse sampler and its number of steps.
        num_samples: points (2-D) or images in the strip.
        forward_frames: frames of the forward process (default: ``steps``).
        data: data samples to use instead of the card's sampler (required for image models).

    Returns:
        (frames, labels, card): each frame an array (num_samples, *sample_shape).
    """
    card = pretrained.get_card(model_name)
    model = pretrained.load(model_name)
    sched = model.schedule
    if data is None:
        if card.data_sampler is None:
            raise ValueError(f"model {model_name!r} has no exact data sampler; pass data=… (real data samples)")
        data = card.data_sampler(num_samples, seed)
    x0 = data[:num_samples].to(torch.float32)
    seeds = list(range(seed * 100_003, seed * 100_003 + x0.shape[0]))
    eps = solvers.initial_noise(tuple(x0.shape), seeds)
    grid = solvers.make_grid(sched, steps, spacing="logsnr" if solver != "heun" else "karras")
    # The forward process visits the reverse grid's times in the opposite order (data → noise).
    fwd_times = grid[::-1] if forward_frames is None else [sched.t_zero] + list(
        np.linspace(grid[-2], grid[0], forward_frames))
    frames, labels = [], []
    for t in fwd_times:
        frames.append(sched.q_sample(x0, float(t), eps).numpy())
        labels.append(_label(sched, float(t), "forward  q(x_t | x_0)"))
    x_T = sched.q_sample(x0, grid[0], eps)

    def grab(info: solvers.StepInfo) -> None:
        frames.append(info.x.detach().float().cpu().numpy())
        labels.append(_label(sched, info.t_next, f"reverse  {solver}, step {info.step + 1}/{steps}"))

    frames.append(x_T.numpy())
    labels.append(_label(sched, grid[0], f"reverse  {solver}, start"))
    solvers.sample(model, x_T, solver, steps, timesteps=grid, seeds=seeds, callback=grab, **solver_options)
    return frames, labels, card


def _render_gif(frames, labels, card, path: Path, fps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    two_d = len(card.sample_shape) == 1 and card.sample_shape[0] == 2
    if two_d:
        fig, ax = plt.subplots(figsize=(5, 5.4))
        lim = max(6.0, float(np.abs(frames[0]).max()) * 1.2)
        scat = ax.scatter(frames[0][:, 0], frames[0][:, 1], s=3, alpha=0.6)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        title = ax.set_title(labels[0], fontsize=9)

        def update(k):
            scat.set_offsets(frames[k][:, :2])
            title.set_text(labels[k])
            return scat, title
    else:
        to_img = card.to_images or (lambda x: (x + 1) / 2)

        def strip(x):
            imgs = to_img(torch.from_numpy(x)).clamp(0, 1)  # (B, C, H, W)
            return torch.cat(list(imgs), dim=-1).permute(1, 2, 0).squeeze(-1).numpy()

        first = strip(frames[0])
        fig, ax = plt.subplots(figsize=(min(12, 1.2 * frames[0].shape[0]), 1.9))
        im = ax.imshow(first, cmap="gray" if first.ndim == 2 else None, vmin=0, vmax=1)
        ax.axis("off")
        title = ax.set_title(labels[0], fontsize=9)

        def update(k):
            im.set_data(strip(frames[k]))
            title.set_text(labels[k])
            return im, title

    # Hold the first, middle (pure noise) and last frames a little longer.
    order = [0] * 5 + list(range(len(frames))) + [len(frames) - 1] * 10
    anim = FuncAnimation(fig, lambda k: update(order[k]), frames=len(order), blit=False)
    with atomic_path(path, suffix=".gif") as tmp:
        anim.save(str(tmp), writer=PillowWriter(fps=fps), dpi=80)
    plt.close(fig)


def _write_html(gif: Path, path: Path, command: str, title: str) -> None:
    # The page shows the GIF beside it (same folder) rather than embedding a second copy of it.
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><img src='{html.escape(gif.name)}'/>"
            f"<p>Made by <code>{html.escape(command)}</code></p></body></html>")
    atomic_write_bytes(path, page.encode("utf-8"))


def _reference_data(card, n: int) -> torch.Tensor:
    """n real images of the card's reference set, mapped into the model's data range (image models)."""
    from bench import datasets

    if card.reference != "mnist-test":
        raise ValueError(f"no local reference images for {card.name!r} (reference {card.reference!r}); "
                         "the animation of image models needs the MNIST test set (ddpm_mnist)")
    images = datasets.mnist_test_images()[:n, : card.sample_shape[0]].to(torch.float32) / 255.0
    lo, hi = card.data_range
    return lo + (hi - lo) * images


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m bench.animate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gmm2d", help=f"zoo model (one of: {', '.join(pretrained.available_models())})")
    p.add_argument("--solver", default="dpmpp", help="reverse solver (default dpmpp)")
    p.add_argument("--steps", type=int, default=50, help="solver steps (default 50)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="points (2-D, default 1000) or images in the strip (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and noise (default 0)")
    p.add_argument("--fps", type=int, default=12, help="frames per second of the GIF (default 12)")
    p.add_argument("--out", default=None, help="output path without extension (default runs/animation_MODEL; the committed "
                        "copies are refreshed with --out reports/animation_MODEL)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be a positive integer, got {args.steps}")
    card = pretrained.get_card(args.model)
    two_d = card.sample_shape == (2,)
    n = args.num_samples or (1000 if two_d else 8)
    data = None
    if card.data_sampler is None:
        data = _reference_data(card, n)
    frames, labels, card = trajectory(args.model, args.solver, args.steps, n, args.seed, data=data)
    out = Path(args.out or f"runs/animation_{args.model}")
    out.parent.mkdir(parents=True, exist_ok=True)
    gif, page = out.with_suffix(".gif"), out.with_suffix(".html")
    _render_gif(frames, labels, card, gif, args.fps)
    command = "python -m bench.animate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    _write_html(gif, page, command, f"{args.model}: forward process, then {args.solver} with {args.steps} steps")
    print(f"wrote {gif} and {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
