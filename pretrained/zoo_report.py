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
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import pretrained
import solvers
from pretrained.files import atomic_write_bytes, atomic_write_text

OUT = Path(__file__).resolve().parents[1] / "reports" / "zoo"


def _save_figure(fig, path: Path) -> None:
    """Save ``fig`` to ``path`` (format from its suffix) atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


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
    from bench.metrics import sliced_wasserstein

    gmm = pretrained.get_card("gmm2d")
    data = gmm.data_sampler(n, 12345).numpy()
    floor = sliced_wasserstein(data, gmm.data_sampler(n, 999).numpy())
    numbers = {"n": n, "noise_floor_sw": floor}
    numbers.update(_exact_gmm2d_figure(out, n, data, floor))
    numbers["cm_gmm2d"] = _cm_gmm2d_figure(out, n, data)
    numbers["fm_gmm2d"] = _fm_gmm2d_figure(out, n, data)
    return numbers


def _sw(x, data: np.ndarray) -> float:
    """The sliced Wasserstein distance of samples ``x`` to the exact ``data``."""
    from bench.metrics import sliced_wasserstein
    return sliced_wasserstein(np.asarray(x, np.float64), data)


def _panel_figure(path: Path, panels: list, suptitle: str, figsize: tuple) -> None:
    """One row of scatter panels ``(title, points, colour)`` under ``suptitle``, saved atomically to ``path``."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    for ax, (title, pts, color) in zip(axes, panels):
        _scatter(ax, pts, title, color)
    fig.suptitle(suptitle, fontsize=9)
    _save_figure(fig, path)
    plt.close(fig)


def _exact_gmm2d_figure(out: Path, n: int, data: np.ndarray, floor: float) -> dict:
    """gmm2d: the exact model with a few solvers (``gmm2d.png``); returns their distances to the data."""
    exact = pretrained.load("gmm2d")
    x_T = solvers.initial_noise((n, 2), seeds=range(n), schedule=exact.schedule, dtype=torch.float64)
    numbers, panels = {}, [("exact data", data, "k")]
    for solver, steps in (("euler", 1), ("euler", 10), ("dpmpp_2m", 10)):
        s = solvers.sample(exact, x_T, solver=solver, steps=steps).samples.numpy()
        numbers[f"gmm2d_{solver}_{steps}_sw"] = _sw(s, data)
        panels.append((f"gmm2d, {solver} {steps} steps\nSW {_sw(s, data):.3f}", s, "C0"))
    _panel_figure(out / "gmm2d.png", panels, f"gmm2d (exact ε, VPLinear), n = {n}; SW = sliced W2 to exact data "
                  f"(noise floor {floor:.3f})", (3 * len(panels), 3.2))
    return numbers


def _cm_gmm2d_figure(out: Path, n: int, data: np.ndarray) -> dict:
    """cm_gmm2d: one and two consistency steps against one Euler step of the exact teacher
    (``cm_gmm2d.png``); returns the distances to the data and to the exact ODE end points."""
    from bench.metrics import rmse
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
    c = {
        "exact_ode_sw": _sw(end, data),
        "cm_1_step": {"sw": _sw(one.numpy(), data), "rmse_to_exact_ode": rmse(one.numpy(), end)},
        "cm_2_steps_sigma_0.8": {"sw": _sw(two.numpy(), data), "rmse_to_exact_ode": rmse(two.numpy(), end)},
        "euler_1_step_exact_teacher": {"sw": _sw(euler.numpy(), data),
                                       "rmse_to_exact_ode": rmse(euler.numpy(), end)},
    }
    panels = [("exact data", data, "k"),
              (f"exact PF-ODE end points\nSW {c['exact_ode_sw']:.3f}", end, "C2"),
              (f"cm_gmm2d, 1 step\nSW {c['cm_1_step']['sw']:.3f}, RMSE→ODE {c['cm_1_step']['rmse_to_exact_ode']:.3f}",
               one.numpy(), "C1"),
              (f"exact teacher, 1 Euler step\nSW {c['euler_1_step_exact_teacher']['sw']:.3f}, RMSE→ODE "
               f"{c['euler_1_step_exact_teacher']['rmse_to_exact_ode']:.3f}", euler.numpy(), "C3")]
    _panel_figure(out / "cm_gmm2d.png", panels, f"cm_gmm2d (EDM σ ∈ [0.002, 80]), same x_T = 80·z for every "
                  f"panel, n = {n}", (12, 3.4))
    return c


def _fm_gmm2d_figure(out: Path, n: int, data: np.ndarray) -> dict:
    """fm_gmm2d: Euler on the learned velocity at several step counts (``fm_gmm2d.png``); returns the
    distances to the data and to the exact ODE end points."""
    from bench.metrics import rmse
    card = pretrained.get_card("fm_gmm2d")
    fm = pretrained.load("fm_gmm2d")
    x_T = solvers.initial_noise((n, 2), seeds=range(n), schedule=fm.schedule, dtype=torch.float64)
    end = card.exact_ode(x_T, 1.0, 0.0).numpy()
    numbers = {"exact_ode_sw": _sw(end, data)}
    panels = [("exact data", data, "k")]
    for steps in (1, 4, 16, 100):
        s = solvers.sample(fm, x_T.float(), solver="euler", steps=steps, spacing="uniform").samples.double().numpy()
        numbers[f"euler_{steps}"] = {"sw": _sw(s, data), "rmse_to_exact_ode": rmse(s, end)}
        panels.append((f"fm_gmm2d, Euler {steps}\nSW {_sw(s, data):.3f}, RMSE→ODE {rmse(s, end):.3f}", s, "C4"))
    _panel_figure(out / "fm_gmm2d.png", panels, f"fm_gmm2d (rectified flow, learned velocity), n = {n}",
                  (3 * len(panels), 3.4))
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
    atomic_write_text(args.out / "zoo_report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
