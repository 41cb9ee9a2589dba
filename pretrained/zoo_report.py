"""Make the zoo's pictures and numbers in ``reports/zoo/``.

    python -m pretrained.zoo_report                 # everything (about 2 minutes on 2 CPU cores)
    python -m pretrained.zoo_report --skip-mnist    # only the gmm2d family (no ../shared/assets needed)

Writes ``ddpm_mnist_grid.png`` (64 samples of the authors' 1000-step ancestral sampler: ``solver="ddpm"``,
``variance="large"``), ``gmm2d.png``, ``cm_gmm2d.png``, ``fm_gmm2d.png`` (scatter plots against exact data) and
``zoo_report.json`` (the numbers: forward time of ``ddpm_mnist`` at batch 250, the distances of the learned
models' samples to the data and to the exact probability-flow ODE end points, and the machine).  Files are
written atomically.  The sliced Wasserstein distance is :func:`bench.metrics.sliced_wasserstein`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import pretrained
import solvers
from pretrained.checkpoints import default_permissions

OUT = Path(__file__).resolve().parents[1] / "reports" / "zoo"


def _atomic_path(path: Path) -> str:
    """A temporary file next to ``path`` (renamed onto it once written), with ordinary permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    default_permissions(tmp)
    return tmp


def _save_figure(fig, path: Path) -> None:
    tmp = _atomic_path(path)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _scatter(ax, points: np.ndarray, title: str, color: str) -> None:
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, color=color)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-6, 6)
    ax.set_ylim(-6, 6)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def mnist_section(out: Path, n_grid: int = 64, threads: int = 2) -> dict:
    """The ddpm_mnist sample grid and the network's forward time at batch 250."""
    import matplotlib.pyplot as plt

    card = pretrained.get_card("ddpm_mnist")
    model = pretrained.load("ddpm_mnist")
    x = torch.randn(250, 1, 28, 28)
    t = torch.full((250,), 0.5)
    times = []
    with torch.no_grad():
        model.fn(x, t)
        for _ in range(10):
            t0 = time.perf_counter()
            model.fn(x, t)
            times.append(time.perf_counter() - t0)
    forward = float(np.median(times))

    x_T = solvers.initial_noise((n_grid, 1, 28, 28), seeds=range(n_grid), schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="ddpm", steps=1000, spacing="uniform", variance="large")
    img = card.to_images(res.samples)[:, 0].numpy()
    side = int(np.ceil(np.sqrt(n_grid)))
    canvas = np.ones((side * 30, side * 30))
    for k in range(n_grid):
        r, c = divmod(k, side)
        canvas[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = img[k]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title("ddpm_mnist: solver='ddpm', variance='large', 1000 steps (the authors' sampler), seeds 0–63",
                 fontsize=8)
    _save_figure(fig, out / "ddpm_mnist_grid.png")
    plt.close(fig)
    return {"forward_seconds_batch_250": forward, "forward_ms_per_sample": 1000 * forward / 250,
            "forward_seconds_batch_250_min": float(min(times)),
            "forward_threads": torch.get_num_threads(),
            "grid": {"file": "ddpm_mnist_grid.png", "samples": n_grid, "nfe": res.nfe,
                     "seconds": res.time_total, "mean_intensity": float(img.mean())}}


def gmm2d_section(out: Path, n: int = 2000) -> dict:
    """Scatter plots of gmm2d, cm_gmm2d and fm_gmm2d, and their distances to the data / exact ODE."""
    import matplotlib.pyplot as plt
    from bench.metrics import rmse, sliced_wasserstein

    numbers = {}
    gmm = pretrained.get_card("gmm2d")
    data = gmm.data_sampler(n, 12345).numpy()
    floor = sliced_wasserstein(data, gmm.data_sampler(n, 999).numpy())
    numbers["n"] = n
    numbers["noise_floor_sw"] = floor

    def sw(x):
        return sliced_wasserstein(np.asarray(x, np.float64), data)

    # gmm2d: the exact model with a few solvers.
    exact = pretrained.load("gmm2d")
    x_T = solvers.initial_noise((n, 2), seeds=range(n), schedule=exact.schedule, dtype=torch.float64)
    panels = [("exact data", data, "k")]
    for solver, steps in (("euler", 1), ("euler", 10), ("dpmpp_2m", 10)):
        s = solvers.sample(exact, x_T, solver=solver, steps=steps).samples.numpy()
        numbers[f"gmm2d_{solver}_{steps}_sw"] = sw(s)
        panels.append((f"gmm2d, {solver} {steps} steps\nSW {sw(s):.3f}", s, "C0"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    for ax, (title, pts, color) in zip(axes, panels):
        _scatter(ax, pts, title, color)
    fig.suptitle(f"gmm2d (exact ε, VPLinear), n = {n}; SW = sliced W2 to exact data (noise floor {floor:.3f})",
                 fontsize=9)
    _save_figure(fig, out / "gmm2d.png")
    plt.close(fig)

    # cm_gmm2d: one and two consistency steps against one Euler step of the exact teacher.
    card = pretrained.get_card("cm_gmm2d")
    cm = pretrained.load("cm_gmm2d")
    teacher = card.extra["mixture"].as_model(cm.schedule, "x0")
    x_T = solvers.initial_noise((n, 2), seeds=range(n), schedule=cm.schedule, dtype=torch.float64)
    end = card.exact_ode(x_T, cm.schedule.t_max, 0.0).numpy()
    opts = card.default_solver_options["consistency"]
    one = solvers.sample(cm, x_T.float(), solver="consistency", steps=1, spacing="karras", **opts).samples.double()
    two = solvers.sample(cm, x_T.float(), solver="consistency", steps=None, timesteps=[80.0, 0.8, 0.0],
                         seeds=range(n), **opts).samples.double()
    euler = solvers.sample(teacher, x_T, solver="euler", steps=1, spacing="karras").samples
    numbers["cm_gmm2d"] = {
        "exact_ode_sw": sw(end),
        "cm_1_step": {"sw": sw(one.numpy()), "rmse_to_exact_ode": rmse(one.numpy(), end)},
        "cm_2_steps_sigma_0.8": {"sw": sw(two.numpy()), "rmse_to_exact_ode": rmse(two.numpy(), end)},
        "euler_1_step_exact_teacher": {"sw": sw(euler.numpy()), "rmse_to_exact_ode": rmse(euler.numpy(), end)},
    }
    c = numbers["cm_gmm2d"]
    panels = [("exact data", data, "k"),
              (f"exact PF-ODE end points\nSW {c['exact_ode_sw']:.3f}", end, "C2"),
              (f"cm_gmm2d, 1 step\nSW {c['cm_1_step']['sw']:.3f}, RMSE→ODE {c['cm_1_step']['rmse_to_exact_ode']:.3f}",
               one.numpy(), "C1"),
              (f"exact teacher, 1 Euler step\nSW {c['euler_1_step_exact_teacher']['sw']:.3f}, RMSE→ODE "
               f"{c['euler_1_step_exact_teacher']['rmse_to_exact_ode']:.3f}", euler.numpy(), "C3")]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (title, pts, color) in zip(axes, panels):
        _scatter(ax, pts, title, color)
    fig.suptitle(f"cm_gmm2d (EDM σ ∈ [0.002, 80]), same x_T = 80·z for every panel, n = {n}", fontsize=9)
    _save_figure(fig, out / "cm_gmm2d.png")
    plt.close(fig)

    # fm_gmm2d: Euler on the learned velocity at several step counts.
    card = pretrained.get_card("fm_gmm2d")
    fm = pretrained.load("fm_gmm2d")
    x_T = solvers.initial_noise((n, 2), seeds=range(n), schedule=fm.schedule, dtype=torch.float64)
    end = card.exact_ode(x_T, 1.0, 0.0).numpy()
    numbers["fm_gmm2d"] = {"exact_ode_sw": sw(end)}
    panels = [("exact data", data, "k")]
    for steps in (1, 4, 16, 100):
        s = solvers.sample(fm, x_T.float(), solver="euler", steps=steps, spacing="uniform").samples.double().numpy()
        numbers["fm_gmm2d"][f"euler_{steps}"] = {"sw": sw(s), "rmse_to_exact_ode": rmse(s, end)}
        panels.append((f"fm_gmm2d, Euler {steps}\nSW {sw(s):.3f}, RMSE→ODE {rmse(s, end):.3f}", s, "C4"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (title, pts, color) in zip(axes, panels):
        _scatter(ax, pts, title, color)
    fig.suptitle(f"fm_gmm2d (rectified flow, learned velocity), n = {n}", fontsize=9)
    _save_figure(fig, out / "fm_gmm2d.png")
    plt.close(fig)
    return numbers


def main(argv: Optional[list] = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Make the pictures and numbers of reports/zoo/.")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--skip-mnist", action="store_true", help="only the gmm2d family")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m pretrained.zoo_report" + (" --skip-mnist" if args.skip_mnist else ""),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": str(torch.__version__),
                          # other jobs on the machine slow every timing below: the 1-minute load average
                          "load_average_at_start": os.getloadavg()[0]},
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.skip_mnist:
        report["ddpm_mnist"] = mnist_section(args.out)
    report["gmm2d"] = gmm2d_section(args.out)
    path = args.out / "zoo_report.json"
    tmp = _atomic_path(path)
    Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
