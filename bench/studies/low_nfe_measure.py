"""Measurements behind issue 12's solver-side defaults, on the exact analytic mixtures (RMS error against SciPy).

Three tables, printed as Markdown:

* ``adaptive`` — the adaptive solver's mean model calls per sample and RMS error at rtol 1e-2 … 1e-4
  (atol = rtol/10, VP linear, t = 1 → 1e-3) for each method, beside k-diffusion's ``sample_dpm_adaptive``
  when k-diffusion is installed (``pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq
  trampoline``; its ``sampling.py`` is loaded by file path, without the package's heavy ``__init__``).
* ``multistep`` — dpmpp_2m / dpmpp_3m at 5, 10 and 20 steps on grids that end at σ = 0 (the default) and
  that do not (``denoise_to_zero=False``), with ``lower_order_final`` True / False and, for 3M, the
  consistent (2·φ₃) and the published (φ₃, ``official_d2=True``) second-difference weight, and the
  order-2 steps' form (``solver_type``) other than its default ("auto": midpoint where lowered, else φ₂).
* ``variants`` — the same for UniPC (B(h) = bh1 / bh2, order 2 / 3), DEIS (order 1 / 2 / 3) and iPNDM
  (constant-step / variable-step weights).
* ``network`` — the multistep and variants rows on a real network, ``ddpm_mnist`` (DiscreteVP, its default
  log-SNR grid ending at σ = 0), against a 1000-step DPM-Solver++(3M) solution of the same ODE from the same
  x_T (32 held-out samples; the MNIST DDPM from the assets folder).
* ``peers`` — each of our solvers with its default options against k-diffusion's implementation of the same
  method on the same grid (each of k-diffusion's grids: Karras ρ = 7, exponential, polyexponential, VP) at
  5 / 10 / 20 steps, and the ratio ours ÷ theirs.
* ``optimized`` — default vs :func:`solvers.optimize_timesteps` grids, calibrated on seeds 0–63, scored on
  held-out seeds 1000–1255.

Run: ``python -m bench.studies.low_nfe_measure [adaptive|multistep|variants|network|peers|optimized ...]`` (all by
default; a few minutes on two CPU cores).
"""
from __future__ import annotations

import math
import sys

import torch

import pretrained
import solvers
from solvers import schedules
from solvers.interop.k_diffusion import PEER_INSTALL

VP = schedules.VPLinear()
T0, T1 = 1.0, 1e-3
PROBLEMS = ("gmm2d", "gmm")


def _mixture(name: str):
    return pretrained.get_card(name).extra["mixture"]


def _noise(mix, seeds) -> torch.Tensor:
    return solvers.initial_noise((len(seeds), mix.dim), seeds=seeds, dtype=torch.float64)


def _exact(mix, x_T, grid) -> torch.Tensor:
    """The exact final state of a grid: the ODE solution at its last time, or (ending at σ = 0) D at the last
    noise level of the ODE solution there (what every fixed-grid solver returns on its final step)."""
    if grid[-1] > VP.t_zero:
        return mix.ode_solution(VP, x_T, grid[0], grid[-1], rtol=1e-10, atol=1e-12, per_sample=False)
    t = grid[-2]
    x = mix.ode_solution(VP, x_T, grid[0], t, rtol=1e-10, atol=1e-12, per_sample=False)
    return mix.denoise(x, float(VP.alpha(t)), float(VP.sigma(t)))


def _rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt())


def load_k_diffusion_sampling():
    """k-diffusion's ``sampling`` module (loaded by path), or ``None`` when k-diffusion is not installed."""
    from solvers.interop.k_diffusion import load_peer
    try:
        return load_peer("sampling")
    except ImportError:
        return None


def _kd_adaptive(sampling, mix, x_T, rtol: float) -> tuple[float, torch.Tensor]:
    """(model calls, final VP state) of k-diffusion's sample_dpm_adaptive on the same ODE and start."""
    calls = [0]

    def denoiser(x, sigma):  # k-diffusion's D(x̃, σ) on x̃ = x/α, σ = σ/α; VP: α = 1/sqrt(1 + σ²)
        calls[0] += 1
        a = 1.0 / (1.0 + float(sigma[0]) ** 2) ** 0.5
        return mix.denoise(x * a, a, a * float(sigma[0]))

    a0, a1 = float(VP.alpha(T0)), float(VP.alpha(T1))
    y = sampling.sample_dpm_adaptive(denoiser, x_T / a0, float(VP.sigma_ve(T1)), float(VP.sigma_ve(T0)),
                                     rtol=rtol, atol=rtol / 10, disable=True)
    return calls[0], y * a1


ADAPTIVE_RTOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def adaptive_table(n: int = 64) -> list[str]:
    """Calls per sample and RMS error of the adaptive methods (and k-diffusion's) at rtol 1e-2 … 1e-4, and the
    calls dpm23 needs for k-diffusion's error at each tolerance ÷ k-diffusion's calls (log-log interpolated
    along dpm23's curve, which is also run at rtol 3e-5 to cover the tightest)."""
    sampling = load_k_diffusion_sampling()
    rows = ["| problem | rtol | " + " | ".join(f"{m} calls / error" for m in ("dpm23", "bs3")) +
            " | k-diffusion dpm_adaptive calls / error | dpm23 calls at k-diffusion's error ÷ its calls |",
            "|---|---|---|---|---|---|"]
    for name in PROBLEMS:
        mix = _mixture(name)
        model, x_T = mix.as_model(VP), _noise(mix, range(n))
        ref = _exact(mix, x_T, [T0, T1])
        runs = {(m, r): _adaptive_run(model, x_T, ref, m, r) for m in ("dpm23", "bs3") for r in ADAPTIVE_RTOLS}
        curve = [runs["dpm23", r] for r in ADAPTIVE_RTOLS] + [_adaptive_run(model, x_T, ref, "dpm23", 3e-5)]
        for rtol in ADAPTIVE_RTOLS:
            cells = [f"{c:.1f} / {e:.2e}" for c, e in (runs["dpm23", rtol], runs["bs3", rtol])]
            if sampling is None:
                cells += ["(not installed)", "—"]
            else:
                calls, out = _kd_adaptive(sampling, mix, x_T, rtol)
                err = _rms(out, ref)
                cells += [f"{calls} / {err:.2e}", f"{_calls_at(curve, err) / calls:.2f}"]
            rows.append(f"| {name} | {rtol:g} | " + " | ".join(cells) + " |")
    return rows


def _adaptive_run(model, x_T, ref, method: str, rtol: float) -> tuple[float, float]:
    """(mean model calls per sample, RMS error) of the adaptive solver at ``rtol`` (atol = rtol/10)."""
    res = solvers.sample(model, x_T, "adaptive", timesteps=[T0, T1], rtol=rtol, atol=rtol / 10, method=method)
    return sum(res.nfe_per_sample) / len(res.nfe_per_sample), _rms(res.samples, ref)


def _calls_at(curve: list, err: float) -> float:
    """Calls at ``err`` on a (calls, error) curve of falling errors, log-log interpolated (NaN outside it)."""
    for (c0, e0), (c1, e1) in zip(curve, curve[1:]):
        if e1 <= err <= e0:
            return c0 * (c1 / c0) ** (math.log(e0 / err) / math.log(e0 / e1))
    return math.nan


MULTISTEP = [("dpmpp_2m", {"lower_order_final": True}), ("dpmpp_2m", {"lower_order_final": False}),
             ("dpmpp_3m", {"lower_order_final": True, "official_d2": False}),
             ("dpmpp_3m", {"lower_order_final": False, "official_d2": False}),
             ("dpmpp_3m", {"lower_order_final": True, "official_d2": True}),
             ("dpmpp_3m", {"lower_order_final": False, "official_d2": True}),
             ("dpmpp_3m", {"lower_order_final": False, "solver_type": "midpoint"}),
             ("dpmpp_3m", {"lower_order_final": True, "solver_type": "heun"})]


VARIANTS = [("unipc", {"variant": "bh2", "solver_order": 2}), ("unipc", {"variant": "bh1", "solver_order": 2}),
            ("unipc", {"variant": "bh2", "solver_order": 3}), ("unipc", {"variant": "bh1", "solver_order": 3}),
            ("deis", {"solver_order": 1}), ("deis", {"solver_order": 2}), ("deis", {"solver_order": 3}),
            ("ipndm", {"variable_step": False}), ("ipndm", {"variable_step": True})]


def _variant_table(variants: list, n: int) -> list[str]:
    """RMS error of each (solver, options) at NFE 5/10/20 on grids ending and not ending at σ = 0; the best
    of each solver's variants in a row is in bold."""
    head = [f"{s}({', '.join(f'{k}={v}' for k, v in o.items())})" for s, o in variants]
    rows = ["| problem | grid | NFE | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(head)]
    for name in PROBLEMS:
        mix = _mixture(name)
        model, x_T = mix.as_model(VP), _noise(mix, range(n))
        for to_zero in (True, False):
            for steps in (5, 10, 20):
                grid = solvers.make_grid(VP, steps, t_start=T0, t_end=T1, denoise_to_zero=to_zero)
                ref = _exact(mix, x_T, grid)
                errs = [_rms(solvers.sample(model, x_T, s, timesteps=grid, **o).samples, ref) for s, o in variants]
                best = {s: min(e for (s2, _), e in zip(variants, errs) if s2 == s) for s, _ in variants}
                cells = [f"**{e:.2e}**" if e == best[s] else f"{e:.2e}" for (s, _), e in zip(variants, errs)]
                label = "ends at σ=0" if to_zero else "ends at t=1e-3"
                rows.append(f"| {name} | {label} | {steps} | " + " | ".join(cells) + " |")
    return rows


def network_table(n: int = 32, steps_list=(5, 10, 20)) -> list[str]:
    """RMS error on ``ddpm_mnist`` of every (solver, options) of MULTISTEP and VARIANTS at 5/10/20 steps on the
    default grid, against the 1000-step reference; each solver's best variant in bold."""
    from bench.plan import default_spacing
    from bench.studies.low_nfe import problem
    variants = MULTISTEP + VARIANTS
    p = problem("ddpm_mnist", n)
    rows = ["| steps | solver | variant | error |", "|---|---|---|---|"]
    for steps in steps_list:
        errs = []
        for s, o in variants:
            spacing, _ = default_spacing(p.card, p.model.schedule, s, steps)
            grid = solvers.make_grid(p.model.schedule, steps, spacing=spacing)
            errs.append(p.error(solvers.sample(p.model, p.x_T, s, timesteps=grid, timing=False, **o).samples))
        best = {s: min(e for (s2, _), e in zip(variants, errs) if s2 == s) for s, _ in variants}
        for (s, o), e in zip(variants, errs):
            cell = f"**{e:.3g}**" if e == best[s] else f"{e:.3g}"
            rows.append(f"| {steps} | {s} | {', '.join(f'{k}={v}' for k, v in o.items())} | {cell} |")
    return rows


# our solver (default options) → k-diffusion's sampler of the same method and its options
SAME_METHOD = {"ddim": ("euler", {}), "heun": ("heun", {}), "dpmpp_2m": ("dpmpp_2m", {}),
               "dpmpp_2s": ("dpmpp_2s_ancestral", {"eta": 0.0}), "dpmpp_3m": ("dpmpp_3m_sde", {"eta": 0.0})}


# non-default forms of 3M's order-2 steps, against the same k-diffusion sampler (the measurement behind "auto")
SAME_METHOD_VARIANTS = (("dpmpp_3m", {"solver_type": "midpoint"}), ("dpmpp_3m", {"solver_type": "heun"}))


def same_method_rows(sampling, name: str, n: int, steps_list=(5, 10, 20), variants=()) -> list[tuple]:
    """(problem, our solver, grid, steps, our error, k-diffusion's error, our options) for every SAME_METHOD
    pair (default options) and every (solver, options) of ``variants`` on every k-diffusion grid, both from the
    same x_T on the same σ levels, against the exact ODE solution."""
    from bench.studies.low_nfe import KD_GRIDS, k_denoiser, k_sigmas
    mix = _mixture(name)
    model, x_T = mix.as_model(VP), _noise(mix, range(1000, 1000 + n))
    exact = mix.ode_solution(VP, x_T, VP.t_max, VP.t_zero, rtol=1e-10, atol=1e-12, per_sample=False)
    smin, smax = (float(VP.sigma_ve(torch.tensor(t, dtype=torch.float64))) for t in (VP.default_t_end, VP.t_max))
    a0, den, out = float(VP.alpha(torch.tensor(VP.t_max, dtype=torch.float64))), k_denoiser(model), []
    for steps in steps_list:
        for grid_name in KD_GRIDS:
            sigmas = k_sigmas(sampling, grid_name, steps, smin, smax).double()
            sigmas[0] = smax  # k-diffusion's VP grid starts at t = 1 too: the same x_T
            grid = [float(v) for v in VP.t_from_sigma_ve(sigmas[:-1])] + [VP.t_zero]
            for ours, options in [(o, {}) for o in SAME_METHOD] + list(variants):
                theirs, opts = SAME_METHOD[ours]
                mine = solvers.sample(model, x_T, ours, timesteps=grid, timing=False, **options).samples
                with torch.no_grad():
                    kd = getattr(sampling, f"sample_{theirs}")(den, x_T / a0, sigmas, disable=True, **opts)
                out.append((name, ours, grid_name, steps, _rms(mine, exact), _rms(kd, exact), options))
    return out


def peers_table(n: int = 256) -> list[str]:
    """Ours (default options, and SAME_METHOD_VARIANTS) vs k-diffusion's same method on the same grid; the
    ratio ours ÷ theirs."""
    sampling = load_k_diffusion_sampling()
    if sampling is None:
        return [f"k-diffusion is not installed: `{PEER_INSTALL}`"]
    rows = ["| problem | ours (k-diffusion) | grid | steps | ours | k-diffusion | ours ÷ theirs |",
            "|---|---|---|---|---|---|---|"]
    for name in PROBLEMS:
        for prob, ours, grid, steps, e_ours, e_kd, options in same_method_rows(sampling, name, n,
                                                                               variants=SAME_METHOD_VARIANTS):
            label = ours + "".join(f", {k}={v}" for k, v in options.items())
            rows.append(f"| {prob} | {label} ({SAME_METHOD[ours][0]}) | {grid} | {steps} | {e_ours:.3g} | "
                        f"{e_kd:.3g} | {e_ours / e_kd:.3f} |")
    return rows


def multistep_table(n: int = 256) -> list[str]:
    """RMS error of the DPM-Solver++ multistep variants at NFE 5/10/20 (see :func:`_variant_table`)."""
    return _variant_table(MULTISTEP, n)


def variants_table(n: int = 256) -> list[str]:
    """RMS error of the UniPC (B(h), order), DEIS (order) and iPNDM (constant / variable step) variants at NFE
    5/10/20 (see :func:`_variant_table`)."""
    return _variant_table(VARIANTS, n)


def _held_out_errors(model, mix, held, solver: str, grid) -> tuple[float, float]:
    """(RMS error over every entry, median of the per-sample RMS errors) of ``solver`` on ``grid``.

    The median is shown beside the RMS because one held-out sample near the boundary between two modes (where
    the flow separates neighbouring starts) can hold most of the RMS: on the 64-D mixture, seeds 1000–1255,
    one sample's error is 0.96 at 20 steps, the next 0.034.
    """
    out, exact = solvers.sample(model, held, solver, timesteps=list(grid)).samples, _exact(mix, held, grid)
    per_sample = (out - exact).reshape(len(held), -1).pow(2).mean(dim=1).sqrt()
    return _rms(out, exact), float(per_sample.median())


def optimized_table() -> list[str]:
    """Held-out error of default vs optimised grids (dpmpp_2m, dpmpp_3m, unipc at 5/10/20 steps)."""
    rows = ["| problem | solver | steps | RMS default → optimized | median per-sample default → optimized | "
            "optimiser calls (calibration 64) |", "|---|---|---|---|---|---|"]
    for name in PROBLEMS:
        mix = _mixture(name)
        model, cal, held = mix.as_model(VP), _noise(mix, range(64)), _noise(mix, range(1000, 1256))
        for solver in ("dpmpp_2m", "dpmpp_3m", "unipc"):
            for steps in (5, 10, 20):
                opt = solvers.optimize_timesteps(model, cal, solver=solver, steps=steps)
                (r0, m0), (r1, m1) = (_held_out_errors(model, mix, held, solver, g)
                                      for g in (opt.default_timesteps, opt.timesteps))
                rows.append(f"| {name} | {solver} | {steps} | {r0:.2e} → {r1:.2e} ({r1 / r0:.2f}×) | "
                            f"{m0:.2e} → {m1:.2e} ({m1 / m0:.2f}×) | {opt.nfe} |")
    return rows


TABLES = {"adaptive": adaptive_table, "multistep": multistep_table, "variants": variants_table,
          "network": network_table, "peers": peers_table, "optimized": optimized_table}


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(TABLES)
    unknown = [a for a in names if a not in TABLES]
    if unknown:
        raise SystemExit(f"unknown table(s) {unknown}; valid: {', '.join(TABLES)}")
    torch.set_num_threads(1)
    for name in names:
        print(f"\n## {name}\n")
        print("\n".join(TABLES[name]()))


if __name__ == "__main__":
    main()
