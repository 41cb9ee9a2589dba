"""Best quality at 4–20 model calls: our solvers on their default and optimised grids against the peers' samplers
on theirs, in one run.

    python -m bench.low_nfe                        # → reports/low_nfe.md (gmm2d, gmm, ddpm_mnist)
    python -m bench.low_nfe --models gmm2d --out /tmp/low_nfe.md

For each problem and NFE budget (model calls per sample: 4, 5, 6, 8, 10, 15, 20) every sampler × grid that
spends exactly that many calls is run from the same x_T on **held-out** seeds (1000 …), and scored by the RMS
difference from the probability-flow ODE's end point from the same x_T:

* ``gmm2d``, ``gmm`` (2-D ring and 64-D mixtures, VP linear, t = 1 → σ = 0): the exact ODE solution.  Ours:
  each solver on its paper's grid and (ddim, dpmpp_2m, dpmpp_3m, unipc) on a grid from
  :func:`solvers.optimize_timesteps` with ``free_start=True`` (its first time may move below t = 1, x_T then
  standing for the state there, as diffusers' "leading" timesteps do; still scored against the ODE from
  t = 1), calibrated on seeds 0–63 (disjoint from the scored ones; on ddpm_mnist seeds 0–15, a 1e-4
  reference and 30 search runs per stage, for the CPU's sake).  k-diffusion's samplers on its grids (Karras ρ = 7, exponential = uniform
  in log σ, polyexponential ρ = 2, its VP grid), through a D(x/α, σ/α) wrapper of the same model.
* ``ddpm_mnist`` (a real network, DiscreteVP): a 1000-step DPM-Solver++(3M) solution of the same ODE (every
  trained index).  Ours (default and optimised grids), k-diffusion's samplers, and diffusers' own schedulers
  (DDIM, DPM-Solver++ 2M/3M, UniPC, DEIS, Euler, Heun; default timesteps, Karras σ where offered, trailing
  spacing) driven by the loop a diffusers pipeline runs, on ᾱ given as ``trained_betas`` from the model.

A peer's "best" is the best of all its samplers × grids at that NFE (chosen with hindsight on the scored
seeds — generous to the peers); ours likewise over solvers × {default, optimised}.
"""
from __future__ import annotations

import argparse
import functools
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import pretrained
import solvers
from bench.plan import default_spacing
from bench.results import atomic_write_text

NFES = (4, 5, 6, 8, 10, 15, 20)
OURS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm", "heun", "dpmpp_2s")
TWO_CALLS = {"heun", "dpmpp_2s"}            # 2N − 1 model calls for N steps ending at σ = 0
OPTIMISED = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc")
KD_SAMPLERS = {"euler": 1, "heun": 2, "dpm_2": 2, "lms": 1, "dpmpp_2m": 1, "dpmpp_2s_ancestral": 2,
               "dpmpp_3m_sde": 1}
KD_GRIDS = ("karras", "exponential", "polyexponential", "vp")
CALIBRATION, HELD_OUT = range(64), range(1000, 1256)
# On a real network the optimiser's defaults (an rtol 1e-6 reference, 120 search runs on 64 samples) cost tens of
# minutes per grid on a CPU: there it calibrates on 16 samples, with an rtol 1e-4 reference and 30 search runs.
OPTIMIZER_NETWORK = {"evaluations": 30, "reference_rtol": 1e-4}
NETWORK_CALIBRATION = 16


@dataclass
class Problem:
    """A model, its scored start points and their ODE end points."""

    name: str
    card: object
    model: solvers.DiffusionModel
    x_T: torch.Tensor
    target: torch.Tensor
    x_cal: torch.Tensor

    def error(self, samples: torch.Tensor) -> float:
        return float((samples.double() - self.target).pow(2).mean().sqrt())


def steps_for(nfe: int, two_calls: bool) -> Optional[int]:
    """Steps that spend exactly ``nfe`` calls (None where none do: an even NFE for a two-call method)."""
    if not two_calls:
        return nfe
    return (nfe + 1) // 2 if nfe % 2 else None


def problem(name: str, n_held: int) -> Problem:
    card = pretrained.get_card(name)
    model = pretrained.load(name)
    dtype = torch.float64 if card.kind == "analytic" else torch.float32
    held = list(HELD_OUT)[:n_held]
    cal = list(CALIBRATION)[:min(64 if card.kind == "analytic" else NETWORK_CALIBRATION, n_held)]
    noise = [solvers.initial_noise((len(s), *card.sample_shape), seeds=s, schedule=model.schedule, dtype=dtype)
             for s in (held, cal)]
    if card.exact_ode is not None:
        target = card.exact_ode(noise[0].double(), float(model.schedule.t_max), 0.0)
    else:
        grid = solvers.make_grid(model.schedule, 1000, spacing="trailing")
        target = solvers.sample(model, noise[0], "dpmpp_3m", timesteps=grid, timing=False).samples.double()
    return Problem(name, card, model, noise[0], target.double(), noise[1])


def ours(p: Problem, nfe: int) -> list[tuple[str, float, Callable]]:
    """(label, error, sampler: x_T → samples) of our solvers on their default grids and, for OPTIMISED, on
    optimised grids."""
    out = []
    for solver in OURS:
        steps = steps_for(nfe, solver in TWO_CALLS)
        if steps is None:
            continue
        spacing, _ = default_spacing(p.card, p.model.schedule, solver, steps)
        grid = solvers.make_grid(p.model.schedule, steps, spacing=spacing)
        out.append(_scored(p, f"{solver} ({spacing})", _ours_sampler(p, solver, grid)))
        if solver in OPTIMISED:
            opt = solvers.optimize_timesteps(p.model, p.x_cal, solver=solver, steps=steps, spacing=spacing,
                                             free_start=True,
                                             **(OPTIMIZER_NETWORK if p.card.kind != "analytic" else {}))
            out.append(_scored(p, f"{solver} (optimized)", _ours_sampler(p, solver, list(opt.timesteps))))
    return out


def _ours_sampler(p: Problem, solver: str, grid) -> Callable:
    return lambda x: solvers.sample(p.model, x, solver, timesteps=list(grid), timing=False).samples


def _scored(p: Problem, label: str, sampler: Callable) -> tuple[str, float, Callable]:
    """(label, the error of ``sampler`` on the scored start points — inf where it gives NaN/Inf —, sampler)."""
    try:
        x = sampler(p.x_T)
    except solvers.NonFiniteError:
        return label, math.inf, sampler
    return label, (p.error(x) if torch.isfinite(x).all() else math.inf), sampler


# -- k-diffusion ------------------------------------------------------------------------------------------------
def k_denoiser(model: solvers.DiffusionModel) -> Callable:
    """D(x̃, s) on x̃ = x/α, s = σ/α (k-diffusion's VE form) of our model."""
    sched = model.schedule

    def denoise(x, sigma):
        t = float(sched.t_from_sigma_ve(torch.tensor([float(sigma.reshape(-1)[0])], dtype=torch.float64))[0])
        a = float(sched.alpha(torch.tensor([t], dtype=torch.float64))[0])
        ca, cb = model.conversion(t)
        xv = x * a
        return ca * xv + cb * model.raw(xv, float(sched.model_time(torch.tensor([t], dtype=torch.float64))[0]))

    return denoise


def k_sigmas(kd, grid: str, n: int, smin: float, smax: float) -> torch.Tensor:
    if grid == "karras":
        return kd.get_sigmas_karras(n, smin, smax, rho=7.0)
    if grid == "exponential":
        return kd.get_sigmas_exponential(n, smin, smax)
    if grid == "polyexponential":
        return kd.get_sigmas_polyexponential(n, smin, smax, rho=2.0)
    return kd.get_sigmas_vp(n)


def k_diffusion(p: Problem, nfe: int, kd) -> list[tuple[str, float, Callable]]:
    sched = p.model.schedule
    t_end = float(sched.default_t_end)
    smin, smax = (float(sched.sigma_ve(torch.tensor([t], dtype=torch.float64))[0]) for t in (t_end, sched.t_max))
    a0 = float(sched.alpha(torch.tensor([float(sched.t_max)], dtype=torch.float64))[0])
    den, out = k_denoiser(p.model), []
    grids = KD_GRIDS if type(sched).__name__ == "VPLinear" else KD_GRIDS[:3]
    for name, calls in KD_SAMPLERS.items():
        steps = steps_for(nfe, calls == 2)
        if steps is None:
            continue
        for grid in grids:
            sigmas = k_sigmas(kd, grid, steps, smin, smax).to(p.x_T.dtype)
            if grid == "vp":
                sigmas[0] = smax  # its own grid starts at t = 1 too; the same x_T
            extra = {"eta": 0.0} if name in ("dpmpp_2s_ancestral", "dpmpp_3m_sde") else {}
            out.append(_scored(p, f"{name} ({grid})", _k_sampler(kd, name, den, sigmas, a0, extra)))
    return out


def _k_sampler(kd, name: str, den: Callable, sigmas: torch.Tensor, a0: float, extra: dict) -> Callable:
    def run(x):
        with torch.no_grad():
            return getattr(kd, f"sample_{name}")(den, x / a0, sigmas.to(x.dtype), disable=True, **extra)
    return run


# -- diffusers --------------------------------------------------------------------------------------------------
DIFFUSERS = {"DDIM": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}, 1),
             "DPM++ 2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}, 1),
             "DPM++ 3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}, 1),
             "UniPC": ("UniPCMultistepScheduler", {}, 1), "DEIS": ("DEISMultistepScheduler", {}, 1),
             "Euler": ("EulerDiscreteScheduler", {}, 1), "Heun": ("HeunDiscreteScheduler", {}, 2)}
DIFFUSERS_GRIDS = {"default": {}, "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}}


def diffusers_samplers(p: Problem, nfe: int) -> list[tuple[str, float, Callable]]:
    import diffusers
    abar = p.model.schedule.alphas_cumprod.double()
    betas = (1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])).tolist()
    out = []
    for label, (cls_name, kw, calls) in DIFFUSERS.items():
        steps = steps_for(nfe, calls == 2)
        if steps is None:
            continue
        for grid, gkw in DIFFUSERS_GRIDS.items():
            cls = getattr(diffusers, cls_name)
            if grid == "karras" and "use_karras_sigmas" not in cls.__init__.__code__.co_varnames:
                continue
            make = functools.partial(cls, num_train_timesteps=len(betas), trained_betas=betas, **kw, **gkw)
            out.append(_scored(p, f"{label} ({grid})", _diffusers_sampler(p, make, steps)))
    return out


def _diffusers_sampler(p: Problem, make: Callable, steps: int) -> Callable:
    """What a diffusers pipeline runs: set_timesteps, scale the noise, scale_model_input → ε → step."""
    def run(x_T):
        sch = make()  # a fresh scheduler each run: the multistep ones keep state
        sch.set_timesteps(steps)
        x = x_T.float() * sch.init_noise_sigma
        mt = p.model.schedule.model_time
        with torch.no_grad():
            for t in sch.timesteps:
                inp = sch.scale_model_input(x, t)
                eps = p.model.raw(inp, float(mt(torch.tensor([float(t)], dtype=torch.float64))[0]))
                x = sch.step(eps, t, x).prev_sample
        return x
    return run


# -- the report -------------------------------------------------------------------------------------------------
def _best(rows: list[tuple]) -> tuple:
    return min(rows, key=lambda r: r[1]) if rows else ("—", math.inf, None)


def _cell(best: tuple) -> str:
    label, err = best[:2]
    return "—" if not math.isfinite(err) and label == "—" else f"{err:.3g} {label}"


FD_NFES = (4, 5, 6, 8, 10)
FD_BATCH = 250


def fd_table(p: Problem, picks: list[tuple], n: int, say) -> list[str]:
    """FD-ResNet-20 against the card's reference data (mnist-test for ddpm_mnist) of ``n`` held-out samples
    (seeds 1000 …) from each picked sampler: ``picks`` are (NFE, who, (label, error, sampler))."""
    from bench.datasets import reference_statistics
    from bench.features import UInt8Images, create_extractor, extract_features, to_uint8_rgb
    from bench.metrics import frechet_distance, gaussian_statistics
    ext, layer, ext_name = create_extractor("fd_resnet20")
    ref = reference_statistics(p.card.reference, ext, layer, ext_name, floor_n=n)
    seeds = list(range(HELD_OUT.start, HELD_OUT.start + n))
    x_T = solvers.initial_noise((n, *p.card.sample_shape), seeds=seeds, schedule=p.model.schedule)
    floor = ref["floor"]
    rows = [f"### {p.name}: FD-ResNet-20 of the best samplers by ODE error, NFE ≤ {max(FD_NFES)}", "",
            f"{n:,} samples (seeds {seeds[0]}–{seeds[-1]}) against {p.card.reference} (n_ref = {ref['n']:,}); the "
            f"noise floor ({n:,} reference images against the rest) is {floor[0]:.3g} ± {floor[1]:.2g}. "
            "A Fréchet distance in CIFAR-10 ResNet-20 features, not FID.", "",
            "| NFE | who | sampler (grid) | ODE error (scored samples) | FD-ResNet-20 |", "|---|---|---|---|---|"]
    for nfe, who, (label, err, sampler) in picks:
        samples = torch.cat([sampler(x_T[i:i + FD_BATCH]) for i in range(0, n, FD_BATCH)])
        feats = extract_features(ext, layer, UInt8Images(to_uint8_rgb(p.card.to_images(samples))))
        fd = frechet_distance(*gaussian_statistics(feats), ref["mu"], ref["sigma"])
        rows.append(f"| {nfe} | {who} | {label} | {err:.3g} | {fd:.3f} |")
        say(f"{p.name} NFE {nfe} {who} {label}: FD-ResNet-20 {fd:.2f}")
    return rows + [""]


def study(names: list[str], n_held: int, nfes, say, fd_samples: int = 0) -> list[str]:
    from solvers.interop.k_diffusion import load_peer
    try:
        kd = load_peer("sampling")
    except ImportError as e:
        kd, note = None, str(e)
    lines = []
    summary = ["| problem | NFE | ours, default grids | ours, optimized grids | k-diffusion, Karras σ | k-diffusion, "
               "best grid | diffusers, default timesteps | diffusers, best grid | ours ÷ best peer |",
               "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        t0 = time.perf_counter()
        p = problem(name, n_held if name != "ddpm_mnist" else min(n_held, 32))
        detail = [f"### {name} ({p.x_T.shape[0]} held-out samples)", "",
                  "| NFE | sampler (grid) | error |", "|---|---|---|"]
        picks = []
        for nfe in nfes:
            mine = ours(p, nfe)
            kdr = k_diffusion(p, nfe, kd) if kd is not None else []
            dfr = diffusers_samplers(p, nfe) if name == "ddpm_mnist" else []
            cells = [_best([r for r in mine if "optimized" not in r[0]]), _best([r for r in mine if "optimized" in r[0]]),
                     _best([r for r in kdr if "(karras)" in r[0]]), _best(kdr),
                     _best([r for r in dfr if "(default)" in r[0]]), _best(dfr)]
            eo, peer = min(cells[0][1], cells[1][1]), min(cells[3][1], cells[5][1])
            ratio = f"**{eo / peer:.2f}×**" if math.isfinite(peer) else "—"
            summary.append(f"| {name} | {nfe} | " + " | ".join(_cell(c) for c in cells) + f" | {ratio} |")
            for who, rows in (("ours", mine), ("k-diffusion", kdr), ("diffusers", dfr)):
                detail += [f"| {nfe} | {who}: {label} | {err:.3g} |" for label, err, _ in sorted(rows, key=lambda r: r[1])]
            say(f"{name} NFE {nfe}: ours {eo:.3g}, best peer {peer:.3g}")
            if nfe in FD_NFES:
                picks += [(nfe, who, _best(rows)) for who, rows in (("ours", mine), ("k-diffusion", kdr),
                                                                    ("diffusers", dfr)) if rows]
        if fd_samples and p.card.kind == "image" and picks:
            detail = fd_table(p, picks, fd_samples, say) + detail
        lines += detail + ["", f"({time.perf_counter() - t0:.0f} s)", ""]
    if kd is None:
        summary.append(f"\nk-diffusion was not available: {note}")
    return summary + [""] + lines


def main(argv=None) -> int:
    """``python -m bench.low_nfe``: run the study and write the report."""
    ap = argparse.ArgumentParser(prog="python -m bench.low_nfe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gmm2d,gmm,ddpm_mnist", help="comma-separated problems")
    ap.add_argument("--held-out", type=int, default=256, help="scored samples (ddpm_mnist: at most 32)")
    ap.add_argument("--out", default="reports/low_nfe.md", help="the report (markdown)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFE budgets")
    ap.add_argument("--fd-samples", type=int, default=1000,
                    help="ddpm_mnist: samples for the FD-ResNet-20 of each group's best sampler at NFE ≤ 10 "
                         "(0: skip; needs the MNIST test set and the ResNet-20 from the assets folder)")
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv_used)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ("gmm2d", "gmm", "ddpm_mnist")]
    if unknown:
        ap.error(f"unknown problem(s) {', '.join(unknown)}; valid: gmm2d, gmm, ddpm_mnist")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    nfes = tuple(int(v) for v in args.nfe.split(","))
    if args.fd_samples < 0 or args.fd_samples == 1:
        ap.error(f"--fd-samples must be 0 (skip) or at least 2, got {args.fd_samples}")
    body = study(names, args.held_out, nfes, lambda s: print(f"bench.low_nfe: {s}", file=sys.stderr, flush=True),
                 fd_samples=args.fd_samples)
    head = ["# Best quality at 4–20 model calls: ours against k-diffusion and diffusers", "",
            (__doc__ or "").split("\n\n", 2)[2].strip(), "",
            f"Produced by `{' '.join(['python -m bench.low_nfe', *map(shlex.quote, argv_used)])}` "
            f"on {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), "
            f"{time.perf_counter() - t0:.0f} s.", "", "## Summary", ""]
    atomic_write_text(Path(args.out), "\n".join(head + body) + "\n")
    print(f"bench.low_nfe: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
