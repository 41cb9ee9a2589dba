"""Two studies behind ``reports/performance.md``: how a benchmark run's time scales, and what bf16 costs in quality.

    python -m bench.perf scaling                       # ddpm_mnist + FD-ResNet-20 features, CPU
    python -m bench.perf scaling --model unet-random --metric fid --inception-random --device cuda
    python -m bench.perf quality                       # float32 vs bf16 autocast: FD on ddpm_mnist, error on gmm

**scaling** — a FID-style run is (sampling the n images) + (features of the n images) + (reference statistics,
computed once and cached).  This times the first two separately: sampling time against the number of samples
(fixed steps) and against the number of steps (fixed samples), with a least-squares line through each and its
R², and feature-extraction time against the number of samples — and from the lines, the share of sampling in
a run of any size.  ``--model unet-random`` is the DDPM CIFAR-10 architecture with random weights (timing
only: no checkpoint needed); ``--inception-random`` gives torch-fidelity's Inception-v3 random weights (timing
only; such features are not FID and no FID is computed from them).

**quality** — the network under bf16 autocast against float32, same seeds, same solver:
FD (ResNet-20 features) on ``ddpm_mnist`` against the MNIST test set for both, and the RMS difference of the
samples; and on ``fm_gmm2d`` (a trained MLP whose target, the analytic gmm2d, has a closed-form flow) the
error against the exact PF-ODE solution for both.  (The analytic models compute in float64, which autocast
does not touch.)  The difference between the two is the quality cost of bf16.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import pretrained
import solvers

from .common import synced_clock

__all__ = ["random_inception_weights", "linear_fit", "run_scaling", "format_scaling", "run_quality",
           "format_quality", "UNET_RANDOM"]

UNET_RANDOM = "unet-random"


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least squares ``y = a + b·x``: intercept a, slope b, R² (1 for two points or a perfect line)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        raise ValueError("a line needs at least two points")
    b, a = np.polyfit(x, y, 1)
    ss_res = float(np.sum((y - (a + b * x)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"intercept": float(a), "slope": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def random_inception_weights(path: os.PathLike, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 feature extractor with random (PyTorch-default) weights to ``path``.

    For timing the FID feature extractor where its real weights cannot be downloaded: the architecture, input
    resizing and every operation are torch-fidelity's; only the values differ, so its features are not FID.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class _Random(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(seed)
        module = _Random("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = original
    path = Path(path)
    torch.save(module.state_dict(), path)
    return path


def _load(model_name: str, device: str):
    """(model, sample shape, to_images) for a card name or ``unet-random``."""
    if model_name == UNET_RANDOM:
        from . import peers as P
        from .common import SAMPLE_SHAPE, load_cifar_unet, unet_call
        unet = load_cifar_unet().to(device)
        model = solvers.DiffusionModel(unet_call(unet), schedule=P.linear_schedule(), prediction="eps")
        return model, SAMPLE_SHAPE, lambda x: ((x + 1) / 2).clamp(0, 1)
    card = pretrained.get_card(model_name)
    if card.kind != "image":
        raise ValueError(f"the scaling study needs an image model (features are measured); {model_name} is "
                         f"{card.kind}. Try ddpm_mnist or {UNET_RANDOM}")
    return pretrained.load(model_name, device=device), tuple(card.sample_shape), card.to_images


def _time_sampling(model, shape, n: int, steps: int, solver: str, batch: int, device) -> float:
    seeds = list(range(n))
    with synced_clock(device) as clock:
        for b0 in range(0, n, batch):
            s = seeds[b0:b0 + batch]
            x = solvers.initial_noise((len(s), *shape), s, schedule=model.schedule, device=device)
            solvers.sample(model, x, solver=solver, steps=steps, seeds=s)
    return clock.seconds


def run_scaling(model_name: str = "ddpm_mnist", samples: Sequence[int] = (100, 200, 400, 800),
                steps: Sequence[int] = (5, 10, 20, 40), steps_samples: Optional[int] = None, solver: str = "ddim",
                fixed_steps: int = 10, batch: int = 100, metric: str = "fd_resnet20", device: str = "cpu",
                inception_random: bool = False, autocast: Optional[str] = None, cuda_graph: bool = False,
                progress: bool = True) -> dict:
    """Time sampling vs samples and vs steps, and feature extraction vs samples (see the module docstring)."""
    import sys

    from ..features import UInt8Images, create_extractor, extract_features, to_uint8_rgb

    model, shape, to_images = _load(model_name, device)
    model = solvers.accelerate(model, autocast=autocast, cuda_graph=cuda_graph)
    weights = None
    tmp = None
    if metric == "fid" and inception_random:
        tmp = tempfile.TemporaryDirectory()
        weights = random_inception_weights(Path(tmp.name) / "inception-random.pth")
    elif metric == "fd_resnet20":
        weights = None
    extractor, layer, _ = create_extractor(metric, device, weights)
    steps_samples = steps_samples or samples[0]
    out = {"model": model_name, "solver": solver, "fixed_steps": fixed_steps, "batch": batch, "metric": metric,
           "device": str(device), "inception_random": inception_random, "autocast": autocast,
           "cuda_graph": cuda_graph, "steps_samples": steps_samples, "by_samples": [], "by_steps": []}
    with torch.no_grad():
        # warm-up: every batch shape and the extractor once
        for n in sorted({min(batch, s) for s in samples} | {min(batch, steps_samples)} |
                        {s % batch for s in list(samples) + [steps_samples] if s % batch}):
            _time_sampling(model, shape, n, 2, solver, batch, device)
        warm = to_uint8_rgb(to_images(torch.zeros((min(batch, 8), *shape), device=device)))
        extract_features(extractor, layer, UInt8Images(warm), device=device, batch_size=batch)
        for n in samples:
            t_s = _time_sampling(model, shape, n, fixed_steps, solver, batch, device)
            seeds = list(range(n))
            x = solvers.initial_noise((n, *shape), seeds, schedule=model.schedule, device=device)
            images = to_uint8_rgb(to_images(x[:n].clamp(-1, 1)))  # any images of the right size time the same
            with synced_clock(device) as clock:
                extract_features(extractor, layer, UInt8Images(images), device=device, batch_size=batch)
            t_f = clock.seconds
            out["by_samples"].append({"n": n, "sampling_s": t_s, "features_s": t_f})
            if progress:
                print(f"  n = {n:>6}: sampling {t_s:8.3f} s, features {t_f:8.3f} s", file=sys.stderr)
        for k in steps:
            t_s = _time_sampling(model, shape, steps_samples, k, solver, batch, device)
            out["by_steps"].append({"steps": k, "sampling_s": t_s})
            if progress:
                print(f"  steps = {k:>4}: sampling {t_s:8.3f} s ({steps_samples} samples)", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    ns = [r["n"] for r in out["by_samples"]]
    out["fit_sampling_samples"] = linear_fit(ns, [r["sampling_s"] for r in out["by_samples"]])
    out["fit_features_samples"] = linear_fit(ns, [r["features_s"] for r in out["by_samples"]])
    out["fit_sampling_steps"] = linear_fit([r["steps"] for r in out["by_steps"]],
                                           [r["sampling_s"] for r in out["by_steps"]])
    return out


def format_scaling(res: dict, command: str, machine: str, project_n: Sequence[int] = (10_000, 50_000),
                   project_steps: Sequence[int] = (10, 50, 1000)) -> str:
    """The scaling study as markdown: the measurements, the lines, and the projected sampling share."""
    fs, ff, fk = res["fit_sampling_samples"], res["fit_features_samples"], res["fit_sampling_steps"]
    feat = {"fid": "Inception-v3 (torch-fidelity" + (", random weights: timing only" if res["inception_random"]
                                                      else "") + ")",
            "fd_resnet20": "ResNet-20 (CIFAR-10 classifier, FD-ResNet-20)"}[res["metric"]]
    model = ("the DDPM CIFAR-10 UNet with random weights (timing only)" if res["model"] == UNET_RANDOM
             else res["model"])
    net = ", ".join(x for x in [f"autocast {res['autocast']}" if res["autocast"] else "",
                                "CUDA graph" if res["cuda_graph"] else ""] if x) or "eager float32"
    lines = [f"Command: `{command}`", "", machine, "",
             f"Model: {model}; solver {res['solver']}; network call {net}; batch {res['batch']}; on "
             f"{res['device']}.  Features: {feat}.", "",
             f"Time against the number of samples ({res['fixed_steps']} steps):", "",
             "| samples | sampling s | feature extraction s | sampling share |", "|---:|---:|---:|---:|"]
    for r in res["by_samples"]:
        lines.append(f"| {r['n']:,} | {r['sampling_s']:.3f} | {r['features_s']:.3f} | "
                     f"{r['sampling_s'] / (r['sampling_s'] + r['features_s']):.1%} |")
    lines += ["", f"Time against the number of steps ({res['steps_samples']:,} samples):", "",
              "| steps | sampling s | s per step |", "|---:|---:|---:|"]
    lines += [f"| {r['steps']} | {r['sampling_s']:.3f} | {r['sampling_s'] / r['steps']:.4f} |" for r in res["by_steps"]]
    lines += ["", "Least-squares lines (time = a + b·x):", "",
              "| what | a (s) | b | R² |", "|---|---:|---:|---:|",
              f"| sampling vs samples | {fs['intercept']:.4f} | {fs['slope'] * 1e3:.4f} ms per sample | {fs['r2']:.5f} |",
              f"| features vs samples | {ff['intercept']:.4f} | {ff['slope'] * 1e3:.4f} ms per sample | {ff['r2']:.5f} |",
              f"| sampling vs steps | {fk['intercept']:.4f} | {fk['slope'] * 1e3:.3f} ms per step | {fk['r2']:.5f} |",
              "", "Projected from the lines (sampling per sample per step = the samples line's slope / "
              f"{res['fixed_steps']} steps; reference statistics are cached after the first run and not counted):",
              "", "| samples | steps | sampling s | features s | sampling share |", "|---:|---:|---:|---:|---:|"]
    per_sample_step = fs["slope"] / res["fixed_steps"]
    for n in project_n:
        for k in project_steps:
            s = per_sample_step * n * k
            f = ff["intercept"] + ff["slope"] * n
            lines.append(f"| {n:,} | {k} | {s:,.0f} | {f:,.0f} | {s / (s + f):.1%} |")
    return "\n".join(lines) + "\n"


# -- quality cost of bf16 ----------------------------------------------------------------------------------
def run_quality(steps: Sequence[int] = (10, 50), solvers_: Sequence[str] = ("ddim", "dpmpp_2m"),
                mnist_samples: int = 1000, gmm_samples: int = 2000, device: str = "cpu", autocast: str = "bf16",
                progress: bool = True) -> list[dict]:
    """Quality with the network in float32 and under ``autocast`` (see the module docstring)."""
    return (_mnist_quality_rows(steps, solvers_, mnist_samples, device, autocast, progress)
            + _gmm_quality_rows(steps, solvers_, gmm_samples, device, autocast, progress))


class _MnistFD:
    """FD-ResNet-20 of ``ddpm_mnist`` samples against the MNIST test set (its statistics computed once)."""

    def __init__(self, card, device: str):
        from .. import metrics as M
        from ..datasets import mnist_test_images
        from ..features import UInt8Images, create_extractor, extract_features

        self.card, self.device = card, device
        self.extractor, self.layer, _ = create_extractor("fd_resnet20", device)
        ref = extract_features(self.extractor, self.layer, UInt8Images(mnist_test_images()), device=device,
                               batch_size=500)
        self.mu_r, self.sig_r = M.gaussian_statistics(ref)

    def __call__(self, samples: torch.Tensor) -> float:
        from .. import metrics as M
        from ..features import UInt8Images, extract_features, to_uint8_rgb

        feats = extract_features(self.extractor, self.layer, UInt8Images(to_uint8_rgb(self.card.to_images(samples))),
                                 device=self.device, batch_size=500)
        mu, sig = M.gaussian_statistics(feats)
        return M.frechet_distance(mu, sig, self.mu_r, self.sig_r)


def _mnist_quality_rows(steps: Sequence[int], solvers_: Sequence[str], n: int, device: str, autocast: str,
                        progress: bool) -> list[dict]:
    """ddpm_mnist: FD-ResNet-20 against the MNIST test set in float32 and under ``autocast`` (same noise), the
    RMS difference of the two sample sets, and the FD spread between two float32 seed sets for scale."""
    import sys

    from ..plan import default_spacing

    card = pretrained.get_card("ddpm_mnist")
    base = pretrained.load("ddpm_mnist", device=device)
    fast = solvers.accelerate(base, autocast=autocast)
    fd = _MnistFD(card, device)
    seeds, other = list(range(n)), list(range(n, 2 * n))
    rows = []
    for slv in solvers_:
        for k in steps:
            spacing, _ = default_spacing(card, base.schedule, solvers.solver_class(slv).name, k)

            def run(model, seed_list):
                x = solvers.initial_noise((n, *card.sample_shape), seed_list, schedule=base.schedule, device=device)
                with torch.no_grad():
                    return solvers.sample(model, x, solver=slv, steps=k, spacing=spacing, seeds=seed_list).samples
            out = {}
            for name, model in (("float32", base), (autocast, fast)):
                s = run(model, seeds)
                out[name] = (s, fd(s))
            rms = float(((out[autocast][0] - out["float32"][0]) ** 2).mean().sqrt())
            spread = abs(fd(run(base, other)) - out["float32"][1])
            rows.append({"model": "ddpm_mnist", "seed_spread": spread, "solver": slv, "steps": k, "spacing": spacing,
                         "metric": "FD-ResNet-20", "float32": out["float32"][1], "autocast": out[autocast][1],
                         "rms_diff": rms, "n": n})
            if progress:
                print(f"  ddpm_mnist {slv} {k}: FD {out['float32'][1]:.4f} vs {out[autocast][1]:.4f}, "
                      f"RMS diff {rms:.2e}", file=sys.stderr)
    return rows


def _gmm_quality_rows(steps: Sequence[int], solvers_: Sequence[str], n: int, device: str, autocast: str,
                      progress: bool) -> list[dict]:
    """fm_gmm2d: a trained MLP (flow matching) whose target flow is known in closed form (the analytic gmm2d):
    the RMS error against that exact PF-ODE solution in float32 and under ``autocast``.  (The analytic models
    themselves compute in float64, which autocast leaves alone, so they cannot show the cost.)"""
    import sys

    from ..plan import default_spacing, default_t_start

    gcard = pretrained.get_card("fm_gmm2d")
    gbase = pretrained.load("fm_gmm2d", device=device)
    gfast = solvers.accelerate(gbase, autocast=autocast)
    seeds = list(range(n))
    rows = []
    for slv in solvers_:
        for k in steps:
            name_ = solvers.solver_class(slv).name
            spacing, _ = default_spacing(gcard, gbase.schedule, name_, k)
            grid = solvers.make_grid(gbase.schedule, k, spacing=spacing, t_start=default_t_start(gbase.schedule, name_))
            x = solvers.initial_noise((n, *gcard.sample_shape), seeds, schedule=gbase.schedule, t=grid[0],
                                      device=device)
            exact = gcard.exact_ode(x.cpu().double(), grid[0], grid[-1]).to(torch.float64)
            errs, samples = {}, {}
            for name, model in (("float32", gbase), (autocast, gfast)):
                with torch.no_grad():
                    s = solvers.sample(model, x, solver=slv, steps=None, timesteps=grid).samples.cpu().double()
                samples[name] = s
                errs[name] = float(((s - exact) ** 2).mean().sqrt())
            rms = float(((samples[autocast] - samples["float32"]) ** 2).mean().sqrt())
            rows.append({"model": "fm_gmm2d", "solver": slv, "steps": k, "spacing": spacing,
                         "metric": "RMS error vs the exact gmm2d PF-ODE", "float32": errs["float32"],
                         "autocast": errs[autocast], "rms_diff": rms, "n": n})
            if progress:
                print(f"  fm_gmm2d {slv} {k}: error {errs['float32']:.3e} vs {errs[autocast]:.3e}", file=sys.stderr)
    return rows


def format_quality(rows: list[dict], command: str, machine: str, autocast: str = "bf16") -> str:
    """The bf16 quality table as markdown."""
    lines = [f"Command: `{command}`", "", machine, "",
             f"The same solver, grid and seeds with the network in float32 and under {autocast} autocast (solver "
             "state float32).  ddpm_mnist: FD-ResNet-20 against the 10,000 MNIST test images (lower is better); "
             "fm_gmm2d (a trained MLP; the analytic models compute in float64, which autocast leaves alone): RMS "
             "error against the exact PF-ODE solution of its target, the analytic gmm2d, from the same x_T.  "
             "*seed spread*: |FD of the same float32 cell with the next n seeds − FD| — a change of FD smaller "
             "than that is noise.  *RMS diff*: the two runs' "
             "samples against each other.", "",
             f"| model | solver | steps | metric | float32 | {autocast} | change | seed spread | RMS diff | samples |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        spread = f"{r['seed_spread']:.3g}" if "seed_spread" in r else "–"
        lines.append(f"| {r['model']} | {r['solver']} | {r['steps']} | {r['metric']} | {r['float32']:.4g} | "
                     f"{r['autocast']:.4g} | {r['autocast'] / r['float32'] - 1:+.1%} | {spread} | "
                     f"{r['rms_diff']:.2e} | {r['n']:,} |")
    return "\n".join(lines) + "\n"
