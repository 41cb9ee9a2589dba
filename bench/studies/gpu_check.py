"""The library's CUDA path checked against its CPU path (run on a machine with a GPU).

    python -m bench.gpu_check --out reports/gpu_check.md

* every registered solver on the analytic ``gmm`` model in float64, the same seeds on the CPU and on CUDA: the
  largest difference of the samples (the per-sample noise is drawn on the CPU for every device, so the
  stochastic solvers must agree too; what differs is the kernels' rounding);
* the network-call fast paths on ``ddpm_mnist`` (a real UNet) on CUDA: CUDA-graph replay against the eager
  call (same kernels: expected equal to rounding), bf16 autocast and channels-last against float32 (reported: they
  change the kernels, so the rounding),
  and the NFE counted;
* the counter-based noise generator (``rng="philox"``): the same 32-bit words on both devices, the normals
  and a stochastic solver's samples to float64 rounding;
* ``--batch-size auto``'s choice for ``ddpm_mnist`` on this GPU.

Exits with status 1 when a check fails (the report says which).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

import pretrained
import solvers

from ..results import atomic_write_text

FLOAT64_TOL = 1e-9       # CPU vs CUDA in float64 (rounding of exp/log/matmul kernels, through ≤ 20 steps)
ADAPTIVE_TOL = 1e-3      # the adaptive solver, whose step decisions may flip on rounding (its default rtol scale)
GRAPH_TOL = 1e-4         # graph replay vs eager in float32 (the same kernels; cuDNN may pick another algorithm)


def check_solvers(steps: int = 8, n: int = 64) -> list[dict]:
    """Each registered solver, CPU vs CUDA, float64, analytic gmm."""
    card = pretrained.get_card("gmm")
    cpu = pretrained.load("gmm", device="cpu")
    gpu = pretrained.load("gmm", device="cuda")
    seeds = list(range(n))
    rows = []
    names = list(dict.fromkeys(solvers.solver_class(n).name for n in solvers.available_solvers()))
    for name in names:
        opts = {"steps": steps}
        try:
            x = solvers.initial_noise((n, *card.sample_shape), seeds, schedule=cpu.schedule, dtype=torch.float64)
            a = solvers.sample(cpu, x, solver=name, seeds=seeds, **opts)
            b = solvers.sample(gpu, x.cuda(), solver=name, seeds=seeds, **opts)
            diff = float((a.samples - b.samples.cpu()).abs().max())
            scale = float(a.samples.abs().max())
            if solvers.solver_class(name).adaptive:  # accept/reject may flip on rounding: agree to its tolerance
                ok = diff <= ADAPTIVE_TOL * max(1.0, scale) and abs(a.nfe - b.nfe) <= 0.1 * a.nfe
            else:
                ok = diff <= FLOAT64_TOL * max(1.0, scale) and a.nfe == b.nfe
            rows.append({"solver": name, "nfe_cpu": a.nfe, "nfe_cuda": b.nfe, "max_diff": diff, "ok": ok,
                         "error": ""})
        except Exception as e:  # noqa: BLE001 — reported, and the check fails
            rows.append({"solver": name, "nfe_cpu": -1, "nfe_cuda": -1, "max_diff": float("nan"), "ok": False,
                         "error": f"{type(e).__name__}: {e}"})
    return rows


def check_philox(n: int = 256) -> list[dict]:
    """Counter-based noise (``rng="philox"``): CPU vs CUDA words and normals, and a stochastic solver with it."""
    from solvers.noise import PhiloxStreams, philox4x32

    rows = []
    g = torch.Generator().manual_seed(0)
    ctr = [torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64) for _ in range(4)]
    key = [torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64) for _ in range(2)]
    a = torch.stack(philox4x32(ctr, key))
    b = torch.stack(philox4x32([c.cuda() for c in ctr], [k.cuda() for k in key])).cpu()
    rows.append({"what": "Philox4x32-10 words, 4096 random counters and keys", "max_diff": float((a - b).abs().max()),
                 "tol": 0.0})
    za = PhiloxStreams(range(n), 1).randn((3, 32, 32), dtype=torch.float64)
    zb = PhiloxStreams(range(n), 1).randn((3, 32, 32), dtype=torch.float64, device="cuda").cpu()
    rows.append({"what": f"normals, {n} samples × 3×32×32, float64", "max_diff": float((za - zb).abs().max()),
                 "tol": 1e-12})
    card = pretrained.get_card("gmm")
    cpu, gpu = pretrained.load("gmm", device="cpu"), pretrained.load("gmm", device="cuda")
    seeds = list(range(64))
    x = solvers.initial_noise((64, *card.sample_shape), seeds, schedule=cpu.schedule, dtype=torch.float64,
                              rng="philox")
    xg = solvers.initial_noise((64, *card.sample_shape), seeds, schedule=cpu.schedule, dtype=torch.float64,
                               rng="philox", device="cuda")
    ra = solvers.sample(cpu, x, solver="ddpm", steps=8, seeds=seeds, rng="philox").samples
    rb = solvers.sample(gpu, xg, solver="ddpm", steps=8, seeds=seeds, rng="philox").samples.cpu()
    rows.append({"what": "ddpm, 8 steps on gmm, rng='philox' (x_T too), float64", "max_diff": float((ra - rb).abs().max()),
                 "tol": FLOAT64_TOL})
    for r in rows:
        r["ok"] = r["max_diff"] <= r["tol"]
    return rows


def check_fast_paths(n: int = 256, steps: int = 10) -> list[dict]:
    """ddpm_mnist on CUDA: eager vs CUDA graph vs bf16 autocast (and both), DPM-Solver++(2M)."""
    card = pretrained.get_card("ddpm_mnist")
    model = pretrained.load("ddpm_mnist", device="cuda")
    seeds = list(range(n))
    x = solvers.initial_noise((n, *card.sample_shape), seeds, schedule=model.schedule, device="cuda")
    ref = solvers.sample(model, x, solver="dpmpp_2m", steps=steps)
    rows = []
    for label, kw, tol in [("CUDA graph", dict(cuda_graph=True), GRAPH_TOL),
                           ("bf16 autocast", dict(autocast="bf16"), None),
                           ("bf16 autocast + CUDA graph", dict(autocast="bf16", cuda_graph=True), None),
                           ("channels_last", dict(channels_last=True), None)]:
        try:
            fast = solvers.accelerate(pretrained.load("ddpm_mnist", device="cuda"), **kw)
            res = solvers.sample(fast, x, solver="dpmpp_2m", steps=steps)
            diff = float((res.samples - ref.samples).abs().max())
            rms = float((res.samples - ref.samples).pow(2).mean().sqrt())
            graphs = fast.fn.graphs
            ok = res.nfe == ref.nfe and bool(torch.isfinite(res.samples).all()) and (tol is None or diff <= tol)
            if kw.get("cuda_graph"):
                ok = ok and graphs == 1
            rows.append({"variant": label, "nfe": res.nfe, "max_diff": diff, "rms_diff": rms, "graphs": graphs,
                         "tol": tol, "ok": ok, "error": ""})
        except Exception as e:  # noqa: BLE001
            rows.append({"variant": label, "nfe": -1, "max_diff": float("nan"), "rms_diff": float("nan"),
                         "graphs": 0, "tol": tol, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the markdown report here (atomically)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device here: this check compares the CUDA path with the CPU path")
    from ..autobatch import auto_batch_size
    from .common import machine_description

    command = "python -m bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    srows = check_solvers()
    frows = check_fast_paths()
    prows = check_philox()
    card = pretrained.get_card("ddpm_mnist")
    auto = auto_batch_size(pretrained.load("ddpm_mnist", device="cuda"), tuple(card.sample_shape), "cuda",
                           cap=1 << 16)
    lines = [f"Command: `{command}`", "", machine_description("cuda"), "",
             f"Every registered solver on the analytic `gmm` model, float64, 8 steps, 64 samples, the same seeds "
             f"on the CPU and on CUDA (tolerance {FLOAT64_TOL:g} × max(1, |x|)):", "",
             "| solver | NFE cpu / cuda | max difference | ok |", "|---|---:|---:|---|"]
    lines += [f"| {r['solver']} | {r['nfe_cpu']} / {r['nfe_cuda']} | {r['max_diff']:.2e} | "
              f"{'yes' if r['ok'] else 'NO ' + r['error']} |" for r in srows]
    lines += ["", "Fast paths of the network call on `ddpm_mnist` (CUDA, float32 state, DPM-Solver++(2M), 10 steps, "
              "256 samples) against the eager float32 call:", "",
              "| variant | NFE | max difference | RMS difference | graphs captured | tolerance | ok |",
              "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['nfe']} | {r['max_diff']:.2e} | {r['rms_diff']:.2e} | {r['graphs']} | "
              f"{'–' if r['tol'] is None else format(r['tol'], 'g')} | {'yes' if r['ok'] else 'NO ' + r['error']} |"
              for r in frows]
    lines += ["", "Counter-based noise (`rng='philox'`), CPU against CUDA:", "",
              "| what | max difference | tolerance | ok |", "|---|---:|---:|---|"]
    lines += [f"| {r['what']} | {r['max_diff']:.2e} | {r['tol']:g} | {'yes' if r['ok'] else 'NO'} |" for r in prows]
    lines += ["", f"`--batch-size auto` for ddpm_mnist on this GPU: {auto.note}."]
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text)
    return 0 if all(r["ok"] for r in srows + frows + prows) else 1


if __name__ == "__main__":
    sys.exit(main())
