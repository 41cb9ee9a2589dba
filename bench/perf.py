"""Solver performance against diffusers' schedulers: per-call overhead and end-to-end throughput.

    python -m bench.perf overhead                 # trivial network, batches 1, 64, 1024, CPU
    python -m bench.perf overhead --batches 1,64 --steps 20 --repeats 9 --threads 1
    python -m bench.perf e2e                      # the DDPM CIFAR-10 UNet (random weights), NFE 10 and 50
    python -m bench.perf unet-profile             # where a UNet forward spends its time, float32 vs bf16

**overhead** — what a sampler costs besides the network.  The network is ``fn(x, t) = 0.1·x``, wrapped so that
the time spent inside it is measured and subtracted; the overhead per model call is
(wall time of the whole sampling call − time in the network) / NFE.  "The whole call" is
``solvers.sample(...)`` for ours, and ``set_timesteps`` + the pipelines' loop (``scale_model_input``, network,
``step``) for diffusers' stock scheduler (its own float32 tables, as users run it).  Both run in one process,
interleaved (alternating which goes first), after one warm-up call each; the table gives medians over the
repeats.  Our grid and coefficients are cached per model after the first call (``solvers.loop``), so the
table is the steady state of repeated sampling; the cold, once-per-grid setup is timed separately.

**e2e** — samples per second with a real architecture: diffusers' ``UNet2DModel`` built from
``../shared/assets/ddpm_cifar10_32/unet_config.json`` (random weights, eval mode), our loop calling it as
``fn(x, t) = unet(x, t).sample``, diffusers' loop calling it as its pipelines do, same batch and device, in
one run; plus ours with the network under bf16 autocast and channels_last (solver state float32).

Each command prints a markdown report and writes it atomically to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import solvers
from solvers.base import points_at
from solvers.noise import SeedStreams

from . import _peers as P
from .results import _cpu_name, atomic_write_text, git_commit

__all__ = ["OVERHEAD_METHODS", "Measurement", "overhead_runners", "measure_interleaved", "run_overhead",
           "setup_costs", "run_e2e", "profile_unet", "load_cifar_unet", "main"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ASSETS = PROJECT_ROOT.parent / "shared" / "assets"
UNET_CONFIG = ASSETS / "ddpm_cifar10_32" / "unet_config.json"
SAMPLE_SHAPE = (3, 32, 32)

# Our spacing for each method: the discrete methods on diffusers' "leading" grid, the rest on ours (the
# spacing does not change the cost of a step).
_SPACING = {"ddim": "leading", "ddpm": "leading"}
OVERHEAD_METHODS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "euler", "heun", "ddim_eta1")


def trivial_network(x: torch.Tensor, t) -> torch.Tensor:
    """The stand-in network of the overhead benchmark: one cheap elementwise pass."""
    return 0.1 * x


@dataclass
class Measurement:
    """One timed sampling call: wall-clock seconds, seconds inside the network, network calls, and the
    seconds spent drawing noise (``noise``, in ``draws`` draws of one batch each)."""

    wall: float
    network: float
    calls: int
    noise: float = 0.0
    draws: int = 0

    @property
    def overhead_per_call(self) -> float:
        """Seconds per model call spent outside the network."""
        return (self.wall - self.network) / self.calls


@contextlib.contextmanager
def _timed_attribute(owner, name: str, acc: list):
    """Within the block, calls of ``owner.name`` add their seconds to acc[0] and count in acc[1]."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
            acc[1] += 1

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def overhead_runners(key: str, batch: int, steps: int, network: Callable = trivial_network,
                     shape: Sequence[int] = SAMPLE_SHAPE
                     ) -> tuple[Callable[[], Measurement], Callable[[], Measurement]]:
    """Two callables that each run one full sampling call of method ``key`` and time it: (ours, diffusers').

    Args:
        key: a key of :data:`bench._peers.PEERS` (our solver and the diffusers scheduler of the same method).
        batch, steps, shape: the problem: ``steps`` solver steps on (batch, *shape) float32 samples.
        network: the network both call.
    """
    diffusers = P.import_diffusers()
    spec = P.PEERS[key]
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    seeds = list(range(batch))

    ours_fn = P.TimedFn(network)
    model = solvers.DiffusionModel(ours_fn, schedule=P.linear_schedule(), prediction="eps")
    spacing = _SPACING.get(spec.solver, "logsnr")

    # The noise draws are timed where they happen, inside the loops: our per-sample streams
    # (SeedStreams.randn) and diffusers' randn_tensor as its scheduler module calls it.
    def ours() -> Measurement:
        ours_fn.calls, ours_fn.seconds = 0, 0.0
        noise = [0.0, 0]
        with _timed_attribute(SeedStreams, "randn", noise):
            t0 = time.perf_counter()
            solvers.sample(model, x, spec.solver, steps=steps, spacing=spacing, seeds=seeds, **spec.options)
            wall = time.perf_counter() - t0
        return Measurement(wall, ours_fn.seconds, ours_fn.calls, noise[0], noise[1])

    sched = getattr(diffusers, spec.scheduler)(**spec.config)
    theirs_fn = P.TimedFn(network)
    stochastic = spec.solver == "ddpm" or spec.options.get("eta", 0) > 0

    sched.set_timesteps(steps)
    start = x * sched.init_noise_sigma  # the pipelines' first line; not part of the loop timed below

    module = sys.modules[type(sched).__module__]

    def theirs() -> Measurement:
        theirs_fn.calls, theirs_fn.seconds = 0, 0.0
        generator = torch.Generator().manual_seed(0) if stochastic else None
        noise = [0.0, 0]
        draws_noise = hasattr(module, "randn_tensor")  # the deterministic schedulers' modules lack it
        with _timed_attribute(module, "randn_tensor", noise) if draws_noise else contextlib.nullcontext():
            t0 = time.perf_counter()
            sched.set_timesteps(steps)
            P.run_peer(sched, theirs_fn, start, generator=generator, step_kwargs=spec.step_kwargs)
            wall = time.perf_counter() - t0
        return Measurement(wall, theirs_fn.seconds, theirs_fn.calls, noise[0], noise[1])

    return ours, theirs


def measure_interleaved(runners: dict[str, Callable[[], Measurement]], repeats: int, warmup: int = 1
                        ) -> dict[str, list[Measurement]]:
    """Call every runner ``warmup`` times, then ``repeats`` times each, alternating which goes first."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    out: dict[str, list[Measurement]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(runners[name]())
    return out


def run_overhead(methods: Sequence[str] = OVERHEAD_METHODS, batches: Sequence[int] = (1, 64, 1024), steps: int = 20,
                 repeats: int = 9, shape: Sequence[int] = SAMPLE_SHAPE, progress: bool = True) -> list[dict]:
    """The overhead table's rows: per method and batch, median µs per model call outside the network.

    For the stochastic methods the time spent drawing noise inside each loop is also subtracted, which gives
    the ratio of everything else (``ratio_without_noise``).
    """
    rows = []
    for key in methods:
        if key not in P.PEERS:
            raise ValueError(f"unknown method {key!r}; valid: {', '.join(P.PEERS)}")
        for batch in batches:
            runners = dict(zip(("ours", "theirs"), overhead_runners(key, batch, steps, shape=shape)))
            res = measure_interleaved(runners, repeats)
            o = statistics.median(m.overhead_per_call for m in res["ours"])
            t = statistics.median(m.overhead_per_call for m in res["theirs"])
            nfe_o, nfe_t = res["ours"][0].calls, res["theirs"][0].calls
            row = {"method": P.PEERS[key].label, "scheduler": P.PEERS[key].scheduler, "batch": batch,
                   "steps": steps, "nfe_ours": nfe_o, "nfe_theirs": nfe_t, "ours_us": o * 1e6,
                   "theirs_us": t * 1e6, "ratio": o / t, "note": P.PEERS[key].note, "ratio_without_noise": None}
            if res["ours"][0].draws or res["theirs"][0].draws:
                o_rest = statistics.median((m.wall - m.network - m.noise) / m.calls for m in res["ours"])
                t_rest = statistics.median((m.wall - m.network - m.noise) / m.calls for m in res["theirs"])
                row.update(noise_ours_us=statistics.median(m.noise / m.calls for m in res["ours"]) * 1e6,
                           noise_theirs_us=statistics.median(m.noise / m.calls for m in res["theirs"]) * 1e6,
                           draws_ours=res["ours"][0].draws, draws_theirs=res["theirs"][0].draws,
                           ratio_without_noise=o_rest / t_rest)
            rows.append(row)
            if progress:
                print(f"  {row['method']:<22} B={batch:<5} ours {row['ours_us']:9.1f} µs/call  "
                      f"diffusers {row['theirs_us']:9.1f} µs/call  ratio {row['ratio']:.2f}", file=sys.stderr)
    return rows


def setup_costs(steps_list: Sequence[int] = (20, 1000), repeats: int = 5) -> list[dict]:
    """Cold once-per-grid setup: our grid + coefficients (no cache) vs diffusers' ``set_timesteps``."""
    diffusers = P.import_diffusers()
    schedule = P.linear_schedule()
    rows = []
    for key in ("ddim", "dpmpp_2m"):
        spec = P.PEERS[key]
        sched = getattr(diffusers, spec.scheduler)(**spec.config)
        spacing = _SPACING.get(spec.solver, "logsnr")
        for steps in steps_list:
            def ours():
                model = solvers.DiffusionModel(trivial_network, schedule=schedule, prediction="eps")
                points_at(schedule, model, solvers.make_grid(schedule, steps, spacing=spacing))

            ours_s, theirs_s = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ours()
                ours_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sched.set_timesteps(steps)
                theirs_s.append(time.perf_counter() - t0)
            rows.append({"method": spec.label, "scheduler": spec.scheduler, "steps": steps,
                         "ours_ms": statistics.median(ours_s) * 1e3, "theirs_ms": statistics.median(theirs_s) * 1e3})
    return rows


# -- end to end --------------------------------------------------------------------------------------------
def load_cifar_unet(config_path: os.PathLike = UNET_CONFIG, seed: int = 0, overrides: Optional[dict] = None):
    """The DDPM CIFAR-10 UNet architecture with random weights (seeded), in eval mode.

    Raises:
        FileNotFoundError: the config is absent (it lives in ``../shared/assets``, outside the repository).
    """
    diffusers = P.import_diffusers()
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the e2e benchmark needs ../shared/assets/ddpm_cifar10_32")
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config.update(overrides or {})
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def _unet_fn(unet, bf16_channels_last: bool = False) -> Callable:
    """``fn(x, t) = unet(x, t).sample``; optionally under bf16 autocast with channels_last input."""
    if not bf16_channels_last:
        return lambda x, t: unet(x, t).sample

    def fn(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x.contiguous(memory_format=torch.channels_last), t).sample
        return out.float()  # the solver state stays float32

    return fn


def run_e2e(solver_keys: Sequence[str] = ("ddim", "dpmpp_2m"), nfes: Sequence[int] = (10, 50), batch: int = 2,
            repeats: int = 1, unet=None, bf16: bool = True, progress: bool = True) -> list[dict]:
    """Samples per second of whole sampling calls on the UNet: ours, diffusers', ours with bf16 autocast.

    Every variant samples ``batch`` images in one call of ``nfe`` model calls (= steps for these solvers);
    the variants of one (solver, NFE) run interleaved in one process.
    """
    diffusers = P.import_diffusers()
    unet = load_cifar_unet() if unet is None else unet
    unet_cl = None
    if bf16:
        import copy
        unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    rows = []
    x = torch.randn((batch, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(0))
    # One forward of each network variant first: the first call of a shape sets up its kernels (oneDNN
    # primitives for bf16) and would otherwise be charged to whichever variant happens to run first.
    with torch.no_grad():
        for fn in [_unet_fn(unet)] + ([_unet_fn(unet_cl, True)] if bf16 else []):
            fn(x, torch.full((batch,), 500.0))
    for key in solver_keys:
        spec = P.PEERS[key]
        spacing = _SPACING.get(spec.solver, "logsnr")
        for nfe in nfes:
            runners = {}
            for variant, fn in [("ours", _unet_fn(unet)), ("diffusers", None)] + (
                    [("ours bf16+channels_last", _unet_fn(unet_cl, True))] if bf16 else []):
                if fn is not None:
                    timed = P.TimedFn(fn)
                    model = solvers.DiffusionModel(timed, schedule=P.linear_schedule(), prediction="eps")

                    def run(model=model, timed=timed):
                        timed.calls, timed.seconds = 0, 0.0
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            solvers.sample(model, x, spec.solver, steps=nfe, spacing=spacing, **spec.options)
                        return Measurement(time.perf_counter() - t0, timed.seconds, timed.calls)
                else:
                    sched = getattr(diffusers, spec.scheduler)(**spec.config)
                    timed = P.TimedFn(_unet_fn(unet))

                    def run(sched=sched, timed=timed):
                        timed.calls, timed.seconds = 0, 0.0
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            sched.set_timesteps(nfe)
                            P.run_peer(sched, timed, x * sched.init_noise_sigma, step_kwargs=spec.step_kwargs)
                        return Measurement(time.perf_counter() - t0, timed.seconds, timed.calls)
                runners[variant] = run
            res = measure_interleaved(runners, repeats, warmup=0)
            base = statistics.median(m.wall for m in res["diffusers"])
            for variant, ms in res.items():
                wall = statistics.median(m.wall for m in ms)
                row = {"method": spec.label, "nfe": nfe, "variant": variant, "batch": batch, "calls": ms[0].calls,
                       "wall_s": wall, "samples_per_s": batch / wall, "vs_diffusers": base / wall,
                       "network_s_per_call": statistics.median(m.network / m.calls for m in ms),
                       "outside_network_ms_per_call": statistics.median(
                           (m.wall - m.network) / m.calls for m in ms) * 1e3}
                rows.append(row)
                if progress:
                    print(f"  {spec.label:<12} NFE {nfe:<3} {variant:<26} {row['samples_per_s']:.4f} samples/s "
                          f"({wall:.1f} s)", file=sys.stderr)
    return rows


def profile_unet(batch: int = 2, top: int = 6, unet=None) -> list[dict]:
    """Where one UNet forward spends its time, float32 vs bf16 autocast + channels_last (torch.profiler).

    Returns:
        One row per (variant, operator) for the ``top`` operators by self CPU time, plus each variant's wall
        time of the profiled forward.
    """
    import copy

    from torch.profiler import ProfilerActivity, profile

    unet = load_cifar_unet() if unet is None else unet
    variants = {"float32": _unet_fn(unet),
                "bf16+channels_last": _unet_fn(copy.deepcopy(unet).to(memory_format=torch.channels_last), True)}
    x = torch.randn((batch, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500.0)
    rows = []
    with torch.no_grad():
        for fn in variants.values():
            fn(x, t)  # set the kernels up before profiling
        for name, fn in variants.items():
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(x, t)
            wall = time.perf_counter() - t0
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
            rows += [{"variant": name, "op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                      "forward_ms": wall * 1e3} for e in events]
    return rows


# -- reports -----------------------------------------------------------------------------------------------
def _machine() -> str:
    import diffusers

    commit, dirty = git_commit()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"Machine: {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"load average at the end {load}.  Python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, solvers {solvers.__version__}, git {commit or '?'}"
            f"{' (uncommitted changes)' if dirty else ''}.")


def format_overhead(rows: list[dict], setup: list[dict], command: str) -> str:
    """The overhead report as markdown."""
    lines = [f"Command: `{command}`", "", _machine(), "",
             "Solver overhead per model call (µs, median; network time excluded).  For the stochastic methods "
             "the last column also excludes the time spent drawing noise inside the loops (in brackets: noise µs "
             "per model call, ours / diffusers with one generator):", "",
             "| method (ours) | diffusers scheduler | batch | NFE ours / theirs | ours µs | diffusers µs | "
             "ours / diffusers | without the noise draws |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        without = "–" if r["ratio_without_noise"] is None else (
            f"{r['ratio_without_noise']:.2f} ({r['noise_ours_us']:.0f} / {r['noise_theirs_us']:.0f})")
        lines.append(f"| {r['method']} | {r['scheduler']} | {r['batch']} | {r['nfe_ours']} / {r['nfe_theirs']} | "
                     f"{r['ours_us']:.1f} | {r['theirs_us']:.1f} | **{r['ratio']:.2f}** | {without} |")
    notes = sorted({f"{r['method']}: {r['note']}" for r in rows if r["note"]})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if setup:
        lines += ["", "Once-per-grid setup, cold (ms, median): our grid + coefficients vs `set_timesteps`:", "",
                  "| method | diffusers scheduler | steps | ours ms | diffusers ms |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['scheduler']} | {r['steps']} | {r['ours_ms']:.2f} | {r['theirs_ms']:.2f} |"
                  for r in setup]
    return "\n".join(lines) + "\n"


def format_e2e(rows: list[dict], command: str, batch: int, repeats: int) -> str:
    """The end-to-end report as markdown."""
    lines = [f"Command: `{command}`", "", _machine(), "",
             f"DDPM CIFAR-10 UNet (35.7 M parameters, random weights), batch {batch}, median of {repeats} "
             "interleaved call(s) per variant:", "",
             "| method | NFE | variant | samples/s | seconds per sampling call | vs diffusers | network s per model "
             "call | outside the network, ms per model call |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['variant']} | {r['samples_per_s']:.4f} | {r['wall_s']:.2f} | "
                     f"{r['vs_diffusers']:.3f}× | {r['network_s_per_call']:.3f} | "
                     f"{r['outside_network_ms_per_call']:.2f} |")
    return "\n".join(lines) + "\n"


def format_profile(rows: list[dict], command: str, batch: int) -> str:
    """The UNet profile as markdown."""
    lines = [f"Command: `{command}`", "", _machine(), "",
             f"One forward of the DDPM CIFAR-10 UNet at batch {batch} (profiled; the forward's wall time includes "
             "the profiler's):", "", "| variant | forward ms | operator | self CPU ms | calls |",
             "|---|---:|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['forward_ms']:.0f} | `{r['op']}` | {r['self_ms']:.1f} | {r['calls']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ov = sub.add_parser("overhead", help="per-call solver overhead vs diffusers (trivial network)")
    ov.add_argument("--methods", default=",".join(OVERHEAD_METHODS),
                    help=f"comma-separated keys of bench._peers.PEERS (default: all: {', '.join(OVERHEAD_METHODS)})")
    ov.add_argument("--batches", type=_ints, default=[1, 64, 1024])
    ov.add_argument("--steps", type=int, default=20)
    ov.add_argument("--repeats", type=int, default=9)
    ov.add_argument("--setup-steps", type=_ints, default=[20, 1000])
    ov.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ov.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_overhead.md"))
    e2e = sub.add_parser("e2e", help="samples/s on the DDPM CIFAR-10 UNet (random weights)")
    e2e.add_argument("--solvers", default="ddim,dpmpp_2m")
    e2e.add_argument("--nfe", type=_ints, default=[10, 50])
    e2e.add_argument("--batch", type=int, default=2)
    e2e.add_argument("--repeats", type=int, default=1)
    e2e.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast + channels_last variant")
    e2e.add_argument("--threads", type=int, default=1,
                     help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on the busy core)")
    e2e.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_e2e.md"))
    prof = sub.add_parser("unet-profile", help="operator profile of one UNet forward, float32 vs bf16")
    prof.add_argument("--batch", type=int, default=2)
    prof.add_argument("--threads", type=int, default=1)
    prof.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_unet_profile.md"))
    args = parser.parse_args(argv)

    for name in ("steps", "repeats", "batch", "threads"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be a positive integer")
    torch.set_num_threads(args.threads)
    command = "python -m bench.perf " + " ".join(sys.argv[1:] if argv is None else argv)
    with torch.no_grad():
        if args.command == "overhead":
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            unknown = [m for m in methods if m not in P.PEERS]
            if unknown:
                parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(P.PEERS)}")
            rows = run_overhead(methods, args.batches, args.steps, args.repeats)
            text = format_overhead(rows, setup_costs(args.setup_steps), command)
        elif args.command == "unet-profile":
            text = format_profile(profile_unet(args.batch), command, args.batch)
        else:
            keys = [m.strip() for m in args.solvers.split(",") if m.strip()]
            unknown = [m for m in keys if m not in P.PEERS]
            if unknown:
                parser.error(f"unknown solver key(s) {', '.join(unknown)}; valid: {', '.join(P.PEERS)}")
            rows = run_e2e(keys, args.nfe, args.batch, args.repeats, bf16=not args.no_bf16)
            text = format_e2e(rows, command, args.batch, args.repeats)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
