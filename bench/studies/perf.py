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
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import solvers
from solvers.base import points_at
from solvers.noise import PhiloxStreams, SeedStreams

from ..provenance import PROJECT_ROOT
from ..results import atomic_write_text
from . import peers as P
from . import perf_studies as S
from .common import (SAMPLE_SHAPE, UNET_CONFIG, load_cifar_unet, machine_description, sync_device,  # noqa: F401
                     synced_clock, unet_call)

__all__ = ["OVERHEAD_METHODS", "Measurement", "overhead_runners", "kdiffusion_runner", "KDIFFUSION_SAMPLERS",
           "import_kdiffusion", "measure_interleaved", "run_overhead",
           "setup_costs", "run_e2e", "profile_unet", "load_cifar_unet", "main"]


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
                     shape: Sequence[int] = SAMPLE_SHAPE, device: str = "cpu", rng: str = "torch"
                     ) -> tuple[Callable[[], Measurement], Callable[[], Measurement]]:
    """Two callables that each run one full sampling call of method ``key`` and time it: (ours, diffusers').

    Args:
        key: a key of :data:`bench.studies.peers.PEERS` (our solver and the diffusers scheduler of the same method).
        batch, steps, shape: the problem: ``steps`` solver steps on (batch, *shape) float32 samples.
        network: the network both call.
        device: where the samples live; on CUDA the device is synchronised before and after each call, and
            the network's time is the host time of launching it.
        rng: our per-sample noise generator (``solvers.sample``'s ``rng``).
    """
    diffusers = P.import_diffusers()
    spec = P.PEERS[key]
    dev = torch.device(device)
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(dev)
    seeds = list(range(batch))

    ours_fn = P.TimedFn(network)
    model = solvers.DiffusionModel(ours_fn, schedule=P.linear_schedule(), prediction="eps")
    spacing = _SPACING.get(spec.solver, "logsnr")

    # The noise draws are timed where they happen, inside the loops: our per-sample streams
    # (SeedStreams.randn) and diffusers' randn_tensor as its scheduler module calls it.
    def ours() -> Measurement:
        ours_fn.calls, ours_fn.seconds = 0, 0.0
        noise = [0.0, 0]
        with _timed_attribute(PhiloxStreams if rng == "philox" else SeedStreams, "randn", noise), \
                synced_clock(dev) as clock:
            solvers.sample(model, x, spec.solver, steps=steps, spacing=spacing, seeds=seeds, rng=rng,
                           **spec.options)
        return Measurement(clock.seconds, ours_fn.seconds, ours_fn.calls, noise[0], noise[1])

    sched = getattr(diffusers, spec.scheduler)(**spec.config)
    theirs_fn = P.TimedFn(network)
    stochastic = solvers.get_solver(spec.solver, **spec.options).is_stochastic

    sched.set_timesteps(steps, device=dev)
    start = x * sched.init_noise_sigma  # the pipelines' first line; not part of the loop timed below

    module = sys.modules[type(sched).__module__]

    def theirs() -> Measurement:
        theirs_fn.calls, theirs_fn.seconds = 0, 0.0
        generator = torch.Generator().manual_seed(0) if stochastic else None
        noise = [0.0, 0]
        draws_noise = hasattr(module, "randn_tensor")  # the deterministic schedulers' modules lack it
        with _timed_attribute(module, "randn_tensor", noise) if draws_noise else contextlib.nullcontext(), \
                synced_clock(dev) as clock:
            sched.set_timesteps(steps, device=dev)
            P.run_peer(sched, theirs_fn, start, generator=generator, step_kwargs=spec.step_kwargs)
        return Measurement(clock.seconds, theirs_fn.seconds, theirs_fn.calls, noise[0], noise[1])

    return ours, theirs


# k-diffusion's sampler for each method (the one its users call for it), with its options.  DDIM (η = 0) is
# k-diffusion's Euler in σ; DDIM η = 1 its ancestral Euler; DPM-Solver++(2S) its 2S ancestral sampler with η = 0;
# DPM-Solver++(3M) its 3M SDE sampler with η = 0 (the ODE case).  k-diffusion has no DDPM sampler.
KDIFFUSION_SAMPLERS = {"ddim": ("sample_euler", {}), "euler": ("sample_euler", {}), "heun": ("sample_heun", {}),
                       "dpmpp_2m": ("sample_dpmpp_2m", {}), "dpmpp_3m": ("sample_dpmpp_3m_sde", {"eta": 0.0}),
                       "dpmpp_2s": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
                       "ddim_eta1": ("sample_euler_ancestral", {"eta": 1.0})}
PEER_NAMES = ("diffusers", "k-diffusion")


def import_kdiffusion():
    """``(k_diffusion.sampling, k_diffusion.external)``, or ImportError saying how to get them.

    k-diffusion is not a dependency of this project (its package imports wandb, clean-fid, CLIP, kornia, …);
    the overhead benchmark compares with it when it is installed (its modules are loaded by path, see
    :func:`solvers.interop.k_diffusion.load_peer`).
    """
    from solvers.interop.k_diffusion import load_peer
    try:
        sampling, external = load_peer("sampling", "external")
    except ImportError as e:
        raise ImportError(f"--peers k-diffusion: {e}") from e
    return sampling, external


def kdiffusion_runner(key: str, batch: int, steps: int, network: Callable = trivial_network,
                      shape: Sequence[int] = SAMPLE_SHAPE, device: str = "cpu") -> Callable[[], Measurement]:
    """One full sampling call of k-diffusion's sampler for method ``key``, timed like :func:`overhead_runners`.

    The network is wrapped as k-diffusion's users wrap a discrete ε-network (``DiscreteEpsDDPMDenoiser``: its
    σ → timestep interpolation and scalings run on every call, as they do for them), on the same linear-β
    schedule; the σ grid is ``get_sigmas_karras`` (built inside the timed call, as diffusers' ``set_timesteps``
    is).  The network's own time is subtracted.

    Raises:
        ValueError: a method k-diffusion has no sampler for.
        ImportError: k-diffusion is not installed.
    """
    if key not in KDIFFUSION_SAMPLERS:
        raise ValueError(f"k-diffusion has no sampler for {key!r}; it has: {', '.join(KDIFFUSION_SAMPLERS)}")
    sampling, external = import_kdiffusion()
    dev = torch.device(device)
    betas = torch.linspace(P.BETA_START, P.BETA_END, P.NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    inner = P.TimedFn(network)
    denoiser = external.DiscreteEpsDDPMDenoiser(inner, alphas_cumprod, quantize=False).to(dev)
    sigma_min, sigma_max = float(denoiser.sigma_min), float(denoiser.sigma_max)
    name, options = KDIFFUSION_SAMPLERS[key]
    sampler = getattr(sampling, name)
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(dev)

    def run() -> Measurement:
        inner.calls, inner.seconds = 0, 0.0
        with synced_clock(dev) as clock:
            sigmas = sampling.get_sigmas_karras(steps, sigma_min, sigma_max, device=dev)
            sampler(denoiser, x * sigmas[0], sigmas, disable=True, **options)
        return Measurement(clock.seconds, inner.seconds, inner.calls)

    return run


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
                 repeats: int = 9, shape: Sequence[int] = SAMPLE_SHAPE, progress: bool = True,
                 device: str = "cpu", rng: str = "torch", peers: Sequence[str] = ("diffusers",)) -> list[dict]:
    """The overhead table's rows: per method and batch, median µs per model call outside the network.

    For the stochastic methods the time spent drawing noise inside each loop is also subtracted, which gives
    the ratio of everything else (``ratio_without_noise``).  With ``"k-diffusion"`` in ``peers``, k-diffusion's
    sampler for the method (:data:`KDIFFUSION_SAMPLERS`, where it has one) runs interleaved with the other two
    (``kdiff_us``, ``ratio_kdiff``).
    """
    bad = [p for p in peers if p not in PEER_NAMES]
    if bad or "diffusers" not in peers:
        raise ValueError(f"peers must include diffusers and be among {', '.join(PEER_NAMES)}; got {', '.join(peers)}")
    if "k-diffusion" in peers:
        import_kdiffusion()
    rows = []
    for key in methods:
        if key not in P.PEERS:
            raise ValueError(f"unknown method {key!r}; valid: {', '.join(P.PEERS)}")
        for batch in batches:
            runners = dict(zip(("ours", "theirs"), overhead_runners(key, batch, steps, shape=shape,
                                                                                 device=device, rng=rng)))
            if "k-diffusion" in peers and key in KDIFFUSION_SAMPLERS:
                runners["kdiff"] = kdiffusion_runner(key, batch, steps, shape=shape, device=device)
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
            if "kdiff" in res:
                k = statistics.median(m.overhead_per_call for m in res["kdiff"])
                row.update(kdiff_sampler=KDIFFUSION_SAMPLERS[key][0], kdiff_us=k * 1e6, ratio_kdiff=o / k,
                           nfe_kdiff=res["kdiff"][0].calls)
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
@dataclass(frozen=True)
class E2EVariant:
    """One way of running a whole sampling call in the e2e benchmark.

    ``loop``: "ours" (``solvers.sample``), "diffusers" (the stock scheduler's pipeline loop) or "network" (the
    network alone, NFE calls with nothing else: the floor any sampler can reach with this network call).
    The other fields are :func:`solvers.accelerate`'s options for the network call.
    """

    loop: str
    autocast: Optional[str] = None
    channels_last: bool = False
    compile: "bool | str" = False
    cuda_graph: bool = False

    @property
    def network_key(self) -> tuple:
        return (self.autocast, self.channels_last, self.compile, self.cuda_graph)


E2E_VARIANTS = {
    "diffusers": E2EVariant("diffusers"),
    "ours": E2EVariant("ours"),
    "network alone": E2EVariant("network"),
    "diffusers bf16+CL": E2EVariant("diffusers", "bf16", True),
    "ours bf16+CL": E2EVariant("ours", "bf16", True),
    "ours bf16": E2EVariant("ours", "bf16"),
    "network alone bf16+CL": E2EVariant("network", "bf16", True),
    "ours graph": E2EVariant("ours", cuda_graph=True),
    "network alone graph": E2EVariant("network", cuda_graph=True),
    "ours bf16+CL graph": E2EVariant("ours", "bf16", True, cuda_graph=True),
    "network alone bf16+CL graph": E2EVariant("network", "bf16", True, cuda_graph=True),
    "ours compile": E2EVariant("ours", compile="default"),
    "network alone compile": E2EVariant("network", compile="default"),
    "ours compile+graph": E2EVariant("ours", compile="default", cuda_graph=True),
    "network alone compile+graph": E2EVariant("network", compile="default", cuda_graph=True),
    "ours bf16 compile+graph": E2EVariant("ours", "bf16", compile="default", cuda_graph=True),
    "ours bf16+CL compile": E2EVariant("ours", "bf16", True, compile="default"),
    "ours bf16+CL compile+graph": E2EVariant("ours", "bf16", True, compile="default", cuda_graph=True),
    "network alone bf16+CL compile+graph": E2EVariant("network", "bf16", True, compile="default", cuda_graph=True),
}
E2E_DEFAULTS = {"cpu": ("ours", "diffusers", "ours bf16+CL"),
                "cuda": ("diffusers", "ours", "network alone", "diffusers bf16+CL", "ours bf16+CL",
                         "network alone bf16+CL", "ours graph", "network alone graph", "ours bf16+CL graph",
                         "network alone bf16+CL graph", "ours bf16+CL compile+graph",
                         "network alone bf16+CL compile+graph")}


def run_e2e(solver_keys: Sequence[str] = ("ddim", "dpmpp_2m"), nfes: Sequence[int] = (10, 50), batch: int = 2,
            repeats: int = 1, unet=None, bf16: bool = True, progress: bool = True, device: str = "cpu",
            variants: Optional[Sequence[str]] = None) -> list[dict]:
    """Samples per second of whole sampling calls on the UNet, per variant (:data:`E2E_VARIANTS`).

    Every variant samples ``batch`` images in one call of ``nfe`` model calls (= steps for these solvers);
    the variants of one (solver, NFE) run interleaved in one process, the device synchronised before and after
    each call.  ``variants`` defaults to :data:`E2E_DEFAULTS` for the device type (``bf16=False`` drops the
    bf16 ones).  Each network call is set up (kernels chosen, compiled, graphs captured) by two calls before
    any timing, and each (solver, NFE) runs every variant once untimed first on CUDA or when a variant
    compiles (on the CPU's plain variants that would double a long benchmark for nothing).

    Raises:
        ValueError: an unknown variant, or a CUDA-graph variant on a CPU device.
    """
    diffusers = P.import_diffusers()
    dev = torch.device(device)
    names = _e2e_variant_names(variants, bf16, dev)
    networks = _e2e_networks((load_cifar_unet() if unet is None else unet).to(dev), names)
    x = torch.randn((batch, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(0)).to(dev)
    t_batch = torch.full((batch,), 500.0, device=dev)
    setup_s = _e2e_set_up_networks(networks, names, x, t_batch, dev)
    compiles = any(E2E_VARIANTS[n].compile for n in names)
    rows = []
    for key in solver_keys:
        spec = P.PEERS[key]
        for nfe in nfes:
            runners = {name: _e2e_runner(E2E_VARIANTS[name], networks[E2E_VARIANTS[name].network_key], spec, nfe,
                                         x, t_batch, dev, diffusers) for name in names}
            with torch.no_grad():
                res = measure_interleaved(runners, repeats, warmup=1 if dev.type == "cuda" or compiles else 0)
            rows += _e2e_rows(res, spec, nfe, batch, setup_s, dev, progress)
    return rows


def _e2e_variant_names(variants: Optional[Sequence[str]], bf16: bool, dev: torch.device) -> list[str]:
    """The e2e variants to run: ``variants`` or the device type's defaults, without bf16 ones if not ``bf16``.

    Raises:
        ValueError: an unknown variant, or a CUDA-graph variant on a CPU device.
    """
    names = list(variants or E2E_DEFAULTS["cuda" if dev.type == "cuda" else "cpu"])
    if not bf16:
        names = [n for n in names if E2E_VARIANTS.get(n, E2EVariant("?")).autocast is None]
    unknown = [n for n in names if n not in E2E_VARIANTS]
    if unknown:
        raise ValueError(f"unknown e2e variant(s) {', '.join(unknown)}; valid: {', '.join(E2E_VARIANTS)}")
    if dev.type != "cuda" and any(E2E_VARIANTS[n].cuda_graph for n in names):
        raise ValueError("CUDA-graph variants need --device cuda")
    return names


def _e2e_networks(unet, names: Sequence[str]) -> dict:
    """One :class:`solvers.FastNetwork` per distinct network setting of the variants (keyed by
    :attr:`E2EVariant.network_key`); channels-last ones wrap a channels-last copy of ``unet``."""
    import copy

    unet_cl = None
    if any(E2E_VARIANTS[n].channels_last for n in names):
        unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    networks: dict = {}
    for n in names:
        v = E2E_VARIANTS[n]
        if v.network_key not in networks:
            base = unet_cl if v.channels_last else unet
            networks[v.network_key] = solvers.FastNetwork(
                unet_call(base), autocast=v.autocast, channels_last=v.channels_last, compile=v.compile,
                cuda_graph=v.cuda_graph)
    return networks


def _e2e_set_up_networks(networks: dict, names: Sequence[str], x: torch.Tensor, t_batch: torch.Tensor,
                         dev: torch.device) -> dict:
    """Call each network twice before any timing; returns the seconds this took per network key.

    The first call of a shape sets up its kernels (oneDNN primitives, cuDNN algorithms), compiles, or captures
    the graph (the second is a replay), and would otherwise be charged to whichever variant happens to run first.
    """
    setup_s = {}
    peer_keys = {E2E_VARIANTS[n].network_key for n in names if E2E_VARIANTS[n].loop == "diffusers"}
    with torch.no_grad():
        for key, fn in networks.items():
            with synced_clock(dev) as clock:
                fn(x, t_batch)
                # diffusers' loop passes a 0-dim t; graphs replay the (batch,) one again
                fn(x, torch.tensor(500.0, device=dev) if key in peer_keys else t_batch)
            setup_s[key] = clock.seconds
    return setup_s


def _e2e_runner(v: E2EVariant, fn, spec, nfe: int, x: torch.Tensor, t_batch: torch.Tensor, dev: torch.device,
                diffusers) -> Callable[[], Measurement]:
    """A timed whole sampling call of the peer method ``spec`` at ``nfe`` in the variant's loop (ours, the
    stock diffusers scheduler, or the network alone), calling the network ``fn``."""
    if v.loop == "ours":
        model = solvers.DiffusionModel(fn, schedule=P.linear_schedule(), prediction="eps")
        spacing = _SPACING.get(spec.solver, "logsnr")

        def run():
            with synced_clock(dev) as clock:
                res = solvers.sample(model, x, spec.solver, steps=nfe, spacing=spacing, **spec.options)
            return Measurement(clock.seconds, float("nan"), res.nfe)
    elif v.loop == "network":
        def run():
            with synced_clock(dev) as clock:
                for _ in range(nfe):
                    fn(x, t_batch)
            return Measurement(clock.seconds, float("nan"), nfe)
    else:
        sched = getattr(diffusers, spec.scheduler)(**spec.config)
        timed = P.TimedFn(fn)

        def run():
            timed.calls = 0
            with synced_clock(dev) as clock:
                sched.set_timesteps(nfe, device=dev)
                P.run_peer(sched, timed, x * sched.init_noise_sigma, step_kwargs=spec.step_kwargs)
            return Measurement(clock.seconds, float("nan"), timed.calls)
    return run


def _e2e_rows(res: dict, spec, nfe: int, batch: int, setup_s: dict, dev: torch.device, progress: bool
              ) -> list[dict]:
    """The table rows of one (method, NFE): each variant's median wall time, samples/s, and its speed against
    stock diffusers and against the network alone with the same network setting."""
    walls = {name: statistics.median(m.wall for m in ms) for name, ms in res.items()}
    base = walls.get("diffusers")
    rows = []
    for name, ms in res.items():
        v = E2E_VARIANTS[name]
        floor = next((walls[n] for n in walls if E2E_VARIANTS[n].loop == "network"
                      and E2E_VARIANTS[n].network_key == v.network_key), None)
        wall = walls[name]
        row = {"method": spec.label, "nfe": nfe, "variant": name, "batch": batch, "calls": ms[0].calls,
               "wall_s": wall, "samples_per_s": batch / wall,
               "vs_diffusers": base / wall if base else float("nan"),
               "ms_per_call": wall / ms[0].calls * 1e3,
               "vs_network_alone": wall / floor if floor and v.loop != "network" else float("nan"),
               "setup_s": setup_s[v.network_key], "device": str(dev)}
        rows.append(row)
        if progress:
            print(f"  {spec.label:<12} NFE {nfe:<3} {name:<36} {row['samples_per_s']:10.2f} samples/s "
                  f"({wall * 1e3:.1f} ms)", file=sys.stderr)
    return rows


PROFILE_VARIANTS = {"float32": (None, False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}


def profile_unet(batch: int = 2, top: int = 6, unet=None, device: str = "cpu",
                 variants: Sequence[str] = ("float32", "bf16+channels_last")) -> list[dict]:
    """Where one UNet forward spends its time, per variant of :data:`PROFILE_VARIANTS` (torch.profiler).

    On the CPU operators are ranked by self CPU time; on CUDA by the device time of the kernels each ``aten::``
    operator launches itself (``self_device_time_total``), and ``device_ms`` is that summed over all of them
    (the GPU's busy time, to set against the forward's wall time).

    Returns:
        One row per (variant, operator) for the ``top`` operators, with the variant's wall time of the profiled
        forward (``forward_ms``; includes the profiler's own cost) and ``device_ms`` (CUDA only, else NaN).
    """
    import copy

    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    unet = (load_cifar_unet() if unet is None else unet).to(dev)
    fns = {}
    for name in variants:
        autocast, cl = PROFILE_VARIANTS[name]
        net = copy.deepcopy(unet).to(memory_format=torch.channels_last) if cl else unet
        fns[name] = solvers.FastNetwork(unet_call(net), autocast=autocast, channels_last=cl)
    x = torch.randn((batch, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(0)).to(dev)
    t = torch.full((batch,), 500.0, device=dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    with torch.no_grad():
        for fn in fns.values():
            fn(x, t)  # set the kernels up before profiling
            fn(x, t)
        for name, fn in fns.items():
            sync_device(dev)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                fn(x, t)
                sync_device(dev)
            wall = time.perf_counter() - t0
            events = list(prof.key_averages())
            if cuda:
                ops = [e for e in events if e.key.startswith("aten::")]
                dev_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))  # noqa: E731
                device_ms = sum(dev_time(e) for e in ops) / 1e3
                ranked = sorted(ops, key=dev_time, reverse=True)[:top]
                rows += [{"variant": name, "op": e.key, "self_ms": dev_time(e) / 1e3, "calls": e.count,
                          "forward_ms": wall * 1e3, "device_ms": device_ms} for e in ranked]
            else:
                ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
                rows += [{"variant": name, "op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                          "forward_ms": wall * 1e3, "device_ms": float("nan")} for e in ranked]
    return rows


# -- reports -----------------------------------------------------------------------------------------------
def format_overhead(rows: list[dict], setup: list[dict], command: str, device: str = "cpu",
                    rng: str = "torch") -> str:
    """The overhead report as markdown."""
    where = ("" if torch.device(device).type != "cuda" else
             f"Samples on {device}; each call synchronises the device before and after; the network's time "
             "(subtracted) is the host time of launching its one kernel.  ")
    if rng != "torch":
        where += f"Our stochastic solvers draw their noise with rng={rng!r} (solvers.noise).  "
    lines = [f"Command: `{command}`", "", machine_description(device), "", where +
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
    kd = [r for r in rows if "kdiff_us" in r]
    if kd:
        lines += ["", "Against k-diffusion's sampler for the same method (same run, interleaved; its ε-network wrapped "
                  "in `DiscreteEpsDDPMDenoiser` as its users do; Karras σ grid; noise not separated):", "",
                  "| method (ours) | k-diffusion sampler | batch | NFE ours / k-diffusion | ours µs | k-diffusion µs | "
                  "ours / k-diffusion |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | `{r['kdiff_sampler']}` | {r['batch']} | {r['nfe_ours']} / {r['nfe_kdiff']} | "
                  f"{r['ours_us']:.1f} | {r['kdiff_us']:.1f} | **{r['ratio_kdiff']:.2f}** |" for r in kd]
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
    dev = rows[0]["device"] if rows else "cpu"
    lines = [f"Command: `{command}`", "", machine_description(dev), "",
             f"DDPM CIFAR-10 UNet (35.7 M parameters, random weights), batch {batch}, on {dev}; median of "
             f"{repeats} interleaved call(s) per variant.  *vs diffusers*: diffusers' float32 loop's time / this "
             "variant's; *vs network alone*: this variant's time / NFE calls of the same network call with "
             "nothing else (1.00 = no overhead at all).  CL = channels-last; graph = CUDA-graph replay of the "
             "network call; compile = torch.compile (default mode).", "",
             "| method | NFE | variant | samples/s | ms per sampling call | ms per model call | vs diffusers | "
             "vs network alone | set-up s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_net = "–" if r["vs_network_alone"] != r["vs_network_alone"] else f"{r['vs_network_alone']:.3f}"
        vs_d = "–" if r["vs_diffusers"] != r["vs_diffusers"] else f"{r['vs_diffusers']:.3f}×"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['variant']} | {r['samples_per_s']:.2f} | "
                     f"{r['wall_s'] * 1e3:.1f} | {r['ms_per_call']:.2f} | {vs_d} | {vs_net} | {r['setup_s']:.1f} |")
    return "\n".join(lines) + "\n"


def format_profile(rows: list[dict], command: str, batch: int, device: str = "cpu") -> str:
    """The UNet profile as markdown."""
    cuda = torch.device(device).type == "cuda"
    what = ("device ms (kernels the operator launches itself)" if cuda else "self CPU ms")
    lines = [f"Command: `{command}`", "", machine_description(device), "",
             f"One forward of the DDPM CIFAR-10 UNet at batch {batch} on {device} (profiled; the forward's wall "
             "time includes the profiler's" + ("; *GPU busy* = the device time of every aten operator's kernels"
                                                 if cuda else "") + "):", "",
             f"| variant | forward ms |{' GPU busy ms |' if cuda else ''} operator | {what} | calls |",
             f"|---|---:|{'---:|' if cuda else ''}---|---:|---:|"]
    for r in rows:
        busy = f" {r['device_ms']:.1f} |" if cuda else ""
        lines.append(f"| {r['variant']} | {r['forward_ms']:.1f} |{busy} `{r['op']}` | {r['self_ms']:.2f} | "
                     f"{r['calls']} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per study (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ov = sub.add_parser("overhead", help="per-call solver overhead vs diffusers (trivial network)")
    ov.add_argument("--methods", default=",".join(OVERHEAD_METHODS),
                    help=f"comma-separated keys of bench.studies.peers.PEERS (default: all: {', '.join(OVERHEAD_METHODS)})")
    ov.add_argument("--batches", type=_ints, default=[1, 64, 1024])
    ov.add_argument("--steps", type=int, default=20)
    ov.add_argument("--repeats", type=int, default=9)
    ov.add_argument("--setup-steps", type=_ints, default=[20, 1000])
    ov.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ov.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ov.add_argument("--peers", default="diffusers",
                    help="comma-separated peers: diffusers (always) and k-diffusion (needs the k-diffusion package, "
                         "not a dependency of this project)")
    ov.add_argument("--rng", default="torch", choices=solvers.noise.RNGS,
                    help="our stochastic solvers' noise generator (default torch: per-sample CPU generators)")
    ov.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_overhead.md"))
    e2e = sub.add_parser("e2e", help="samples/s on the DDPM CIFAR-10 UNet (random weights)")
    e2e.add_argument("--solvers", default="ddim,dpmpp_2m")
    e2e.add_argument("--nfe", type=_ints, default=[10, 50])
    e2e.add_argument("--batch", type=int, default=2)
    e2e.add_argument("--repeats", type=int, default=1)
    e2e.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast + channels_last variants")
    e2e.add_argument("--variants", default=None,
                     help="comma-separated variants (default: per device type — cpu: "
                          f"{', '.join(E2E_DEFAULTS['cpu'])}; cuda: {', '.join(E2E_DEFAULTS['cuda'])}); valid: "
                          f"{', '.join(E2E_VARIANTS)}")
    e2e.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    e2e.add_argument("--threads", type=int, default=1,
                     help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on the busy core)")
    e2e.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_e2e.md"))
    prof = sub.add_parser("unet-profile", help="operator profile of one UNet forward, float32 vs bf16")
    prof.add_argument("--batch", type=int, default=2)
    prof.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    prof.add_argument("--variants", default="float32,bf16+channels_last",
                      help=f"comma-separated; valid: {', '.join(PROFILE_VARIANTS)}")
    prof.add_argument("--top", type=int, default=6, help="operators listed per variant")
    prof.add_argument("--threads", type=int, default=1)
    prof.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_unet_profile.md"))
    sc = sub.add_parser("scaling", help="time vs samples and steps; sampling vs feature extraction share")
    sc.add_argument("--model", default="ddpm_mnist",
                    help="an image model card, or 'unet-random' (the DDPM CIFAR-10 UNet, random weights)")
    sc.add_argument("--samples", type=_ints, default=[100, 200, 400, 800])
    sc.add_argument("--steps", type=_ints, default=[5, 10, 20, 40])
    sc.add_argument("--steps-samples", type=int, default=None,
                    help="samples for the steps sweep (default: the first of --samples)")
    sc.add_argument("--fixed-steps", type=int, default=10, help="steps of the samples sweep (default 10)")
    sc.add_argument("--solver", default="ddim")
    sc.add_argument("--batch", type=int, default=100)
    sc.add_argument("--metric", default="fd_resnet20", choices=("fd_resnet20", "fid"))
    sc.add_argument("--inception-random", action="store_true",
                    help="fid: Inception-v3 with random weights (timing only; no download)")
    sc.add_argument("--autocast", default=None, choices=("bf16", "fp16"))
    sc.add_argument("--cuda-graph", action="store_true")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--threads", type=int, default=1)
    sc.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_scaling.md"))
    qu = sub.add_parser("quality", help="quality cost of bf16 autocast (ddpm_mnist FD, fm_gmm2d error)")
    qu.add_argument("--steps", type=_ints, default=[10, 50])
    qu.add_argument("--solvers", default="ddim,dpmpp_2m")
    qu.add_argument("--mnist-samples", type=int, default=1000)
    qu.add_argument("--gmm-samples", type=int, default=2000)
    qu.add_argument("--autocast", default="bf16", choices=("bf16", "fp16"))
    qu.add_argument("--device", default="cpu")
    qu.add_argument("--threads", type=int, default=1)
    qu.add_argument("--out", default=str(PROJECT_ROOT / "reports" / "perf_quality.md"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_common_args(parser, args)
    torch.set_num_threads(args.threads)
    command = "python -m bench.perf " + " ".join(sys.argv[1:] if argv is None else argv)
    run_command = {"overhead": _overhead_text, "scaling": _scaling_text, "quality": _quality_text,
                   "unet-profile": _profile_text, "e2e": _e2e_text}[args.command]
    with torch.no_grad():
        text = run_command(parser, args, command)
    atomic_write_text(args.out, text)
    print(text)
    return 0


def _check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts must be positive and the device a usable torch device (``parser.error`` otherwise)."""
    for name in ("steps", "repeats", "batch", "threads", "fixed_steps", "mnist_samples", "gmm_samples"):
        value = getattr(args, name, 1)
        if isinstance(value, int) and value < 1:
            parser.error(f"--{name} must be a positive integer")
    device = getattr(args, "device", "cpu")
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available here; use --device cpu")
    except RuntimeError as e:
        parser.error(f"--device {device!r} is not a torch device ({e}); use cpu or cuda[:N]")


def _names(text: str) -> list[str]:
    """The non-empty entries of a comma-separated option."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _overhead_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """``overhead``: the per-call overhead table and the setup costs."""
    methods = _names(args.methods)
    unknown = [m for m in methods if m not in P.PEERS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(P.PEERS)}")
    try:
        rows = run_overhead(methods, args.batches, args.steps, args.repeats, device=args.device, rng=args.rng,
                            peers=_names(args.peers))
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    return format_overhead(rows, setup_costs(args.setup_steps), command, args.device, args.rng)


def _scaling_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """``scaling``: time against samples and steps (:func:`bench.studies.perf_studies.run_scaling`)."""
    if len(set(args.samples)) < 2 or len(set(args.steps)) < 2:
        parser.error("--samples and --steps need at least two different values each (a line is fitted)")
    res = S.run_scaling(args.model, args.samples, args.steps, args.steps_samples, args.solver,
                        args.fixed_steps, args.batch, args.metric, args.device, args.inception_random,
                        args.autocast, args.cuda_graph)
    return S.format_scaling(res, command, machine_description(args.device))


def _quality_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """``quality``: the quality cost of autocast (:func:`bench.studies.perf_studies.run_quality`)."""
    rows = S.run_quality(args.steps, _names(args.solvers), args.mnist_samples, args.gmm_samples, args.device,
                         args.autocast)
    return S.format_quality(rows, command, machine_description(args.device), args.autocast)


def _profile_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """``unet-profile``: the operator profile of one UNet forward per variant."""
    names = _names(args.variants)
    bad = [v for v in names if v not in PROFILE_VARIANTS]
    if bad:
        parser.error(f"unknown profile variant(s) {', '.join(bad)}; valid: {', '.join(PROFILE_VARIANTS)}")
    return format_profile(profile_unet(args.batch, args.top, device=args.device, variants=names), command,
                          args.batch, args.device)


def _e2e_text(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """``e2e``: samples per second of whole sampling calls on the UNet (:func:`run_e2e`)."""
    keys = _names(args.solvers)
    unknown = [m for m in keys if m not in P.PEERS]
    if unknown:
        parser.error(f"unknown solver key(s) {', '.join(unknown)}; valid: {', '.join(P.PEERS)}")
    variants = _names(args.variants) if args.variants else None
    try:
        rows = run_e2e(keys, args.nfe, args.batch, args.repeats, bf16=not args.no_bf16, device=args.device,
                       variants=variants)
    except ValueError as e:
        parser.error(str(e))
    return format_e2e(rows, command, args.batch, args.repeats)

if __name__ == "__main__":
    sys.exit(main())
