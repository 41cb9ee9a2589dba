"""The overhead benchmark (``bench/studies/perf.py``): pytest-benchmark measurements, kept tiny.

With ``--benchmark-disable`` (the default in pyproject's addopts) each benchmark runs its sampling call once,
as a plain test of the benchmark's machinery: both loops run, make the model calls they must, and time the
network apart from the rest.  For numbers, run

    python -m pytest tests/studies/test_overhead_benchmark.py --benchmark-enable --benchmark-group-by=param:key

or, for the report's table (larger batches, interleaved, medians), ``python -m bench.perf overhead``.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import solvers  # noqa: E402
from bench.studies import peers as P  # noqa: E402
from bench.studies import perf  # noqa: E402
from solvers.interop.k_diffusion import PEER_INSTALL  # noqa: E402

TINY_SHAPE = (3, 8, 8)
TINY_STEPS = 5


def _expected_nfe(key: str, steps: int) -> tuple[int, int]:
    """(our NFE, diffusers' NFE) for ``steps`` steps of PEERS[key], from the solver's declaration and the
    scheduler's own timesteps — not from a run."""
    spec = P.PEERS[key]
    schedule = P.linear_schedule()
    grid = solvers.make_grid(schedule, steps, spacing=perf._SPACING.get(spec.solver, "logsnr"))
    ours = solvers.get_solver(spec.solver, **spec.options).nfe(grid, schedule.t_zero)
    sched = P.make_scheduler(spec.scheduler, **spec.config)
    sched.set_timesteps(steps)
    return ours, len(sched.timesteps)


@pytest.mark.benchmark
@pytest.mark.parametrize("side", ["ours", "diffusers"])
@pytest.mark.parametrize("key", perf.OVERHEAD_METHODS)
def test_sampling_call_overhead(benchmark, key, side):
    """One whole sampling call of a method, ours or diffusers', with the trivial network."""
    ours, theirs = perf.overhead_runners(key, batch=2, steps=TINY_STEPS, shape=TINY_SHAPE)
    benchmark.group = key
    m = benchmark(ours if side == "ours" else theirs)
    nfe_ours, nfe_theirs = _expected_nfe(key, TINY_STEPS)
    assert m.calls == (nfe_ours if side == "ours" else nfe_theirs)
    assert 0.0 < m.network < m.wall
    assert m.overhead_per_call > 0.0


@pytest.mark.parametrize("key, draws", [("ddpm", (5, 5)), ("ddim_eta1", (5, 6))])
def test_noise_draws_are_timed_inside_the_loops(key, draws):
    """The overhead table subtracts the noise time measured inside each loop: every draw is seen.

    For 6 steps ours draws on the 5 steps that do not end at σ = 0; DDPMScheduler draws at t > 0 only (its
    last timestep is 0 here), EulerAncestralDiscreteScheduler on every step (σ_up = 0 on the last).
    """
    ours, theirs = perf.overhead_runners(key, batch=1, steps=6, shape=TINY_SHAPE)
    m_ours, m_theirs = ours(), theirs()
    assert (m_ours.draws, m_theirs.draws) == draws
    assert 0.0 < m_ours.noise < m_ours.wall and 0.0 < m_theirs.noise < m_theirs.wall
    from solvers.noise import SeedStreams
    assert SeedStreams.randn.__name__ == "randn"  # the timing wrapper is removed after the call


def test_measure_interleaved_alternates_order():
    """Runners are warmed up, then called alternately first and second; every repeat is recorded."""
    calls = []

    def runner(name):
        def run():
            calls.append(name)
            return perf.Measurement(wall=2.0, network=1.0, calls=4)
        return run

    out = perf.measure_interleaved({"a": runner("a"), "b": runner("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in out.values()] == [3, 3]
    assert out["a"][0].overhead_per_call == pytest.approx(0.25)


def test_perf_overhead_command_writes_table(tmp_path):
    """``python -m bench.perf overhead`` writes a markdown table with one row per (method, batch)."""
    threads = torch.get_num_threads()
    out = tmp_path / "overhead.md"
    try:
        perf.main(["overhead", "--methods", "ddim,heun", "--batches", "1,2", "--steps", "3", "--repeats", "1",
                   "--setup-steps", "3", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ddim") or line.startswith("| heun")]
    assert "without the noise draws" in text
    assert len(rows) == 2 * 2 + 1  # 4 overhead rows + the DDIM setup row
    assert "| ddim(eta=0.0) | DDIMScheduler | 2 | 3 / 3 |" in text
    assert "| heun | HeunDiscreteScheduler | 1 | 5 / 5 |" in text  # 2N − 1 calls on both sides
    ratios = [float(line.split("**")[1]) for line in rows if "**" in line]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)


def test_perf_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        perf.main(["overhead", "--methods", "nope", "--out", str(tmp_path / "x.md")])


TINY_UNET = {"block_out_channels": [32, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
             "sample_size": 16}


@pytest.fixture(scope="module")
def tiny_unet(offline_asset):
    offline_asset("ddpm_cifar10_32/unet_config.json")  # read by bench.perf (UNET_CONFIG)
    return perf.load_cifar_unet(overrides=TINY_UNET)


def test_e2e_variants_run_on_a_unet(tiny_unet):
    """The e2e benchmark's three variants run whole sampling calls with the UNet and count its calls."""
    rows = perf.run_e2e(["ddim"], nfes=[2], batch=1, repeats=1, unet=tiny_unet, bf16=True, progress=False)
    assert [r["variant"] for r in rows] == ["ours", "diffusers", "ours bf16+CL"]
    assert all(r["calls"] == 2 and r["samples_per_s"] > 0 for r in rows)
    assert [r for r in rows if r["variant"] == "diffusers"][0]["vs_diffusers"] == 1.0
    no_bf16 = perf.run_e2e(["ddim"], nfes=[2], batch=1, repeats=1, unet=tiny_unet, bf16=False, progress=False)
    assert [r["variant"] for r in no_bf16] == ["ours", "diffusers"]


def test_e2e_network_alone_is_the_floor_of_its_variant(tiny_unet):
    """'network alone' makes NFE calls of the same network call; ours is compared with it (ratio ≥ ~1)."""
    rows = perf.run_e2e(["dpmpp_2m"], nfes=[3], batch=1, repeats=1, unet=tiny_unet, progress=False,
                        variants=["ours", "network alone"])
    ours, alone = rows
    assert alone["calls"] == ours["calls"] == 3
    assert ours["vs_network_alone"] == pytest.approx(ours["wall_s"] / alone["wall_s"])
    assert alone["vs_network_alone"] != alone["vs_network_alone"]  # NaN: not compared with itself


def test_e2e_rejects_unknown_and_cuda_only_variants(tiny_unet):
    with pytest.raises(ValueError, match="unknown e2e variant"):
        perf.run_e2e(["ddim"], nfes=[1], unet=tiny_unet, variants=["ours", "turbo"], progress=False)
    with pytest.raises(ValueError, match="need --device cuda"):
        perf.run_e2e(["ddim"], nfes=[1], unet=tiny_unet, variants=["ours graph"], progress=False)


def test_unet_profile_lists_operators_of_both_variants(tiny_unet):
    rows = perf.profile_unet(batch=1, top=3, unet=tiny_unet)
    assert [r["variant"] for r in rows] == ["float32"] * 3 + ["bf16+channels_last"] * 3
    assert all(r["self_ms"] >= 0 and r["calls"] >= 1 for r in rows)


def test_unet_called_the_same_way_as_diffusers(tiny_unet):
    """Our loop wraps the UNet as fn(x, t) = unet(x, t).sample with t of shape (batch,); diffusers' pipelines
    pass a 0-dim t.  Same network, same DDIM grid: the same samples (float32)."""
    spec = P.PEERS["ddim"]
    sched = P.make_scheduler(spec.scheduler, **spec.config)
    P.set_timesteps(sched, 4)
    grid = P.our_grid(sched, P.linear_schedule())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = solvers.DiffusionModel(perf.unet_call(tiny_unet), schedule=P.linear_schedule(), prediction="eps")
        ours = solvers.sample(model, x, "ddim", steps=None, timesteps=grid).samples
        theirs = P.run_peer(sched, perf.unet_call(tiny_unet), x.clone(), step_kwargs=spec.step_kwargs)
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())


def _has_kdiffusion() -> bool:
    try:
        perf.import_kdiffusion()
        return True
    except ImportError:
        return False


def test_overhead_refuses_unknown_peers(tmp_path):
    with pytest.raises(SystemExit) as e:
        perf.main(["overhead", "--peers", "diffusers,comfy", "--methods", "ddim", "--batches", "1", "--steps", "2",
                   "--repeats", "1", "--out", str(tmp_path / "x.md")])
    assert e.value.code == 2 and not (tmp_path / "x.md").exists()


@pytest.mark.peer
@pytest.mark.skipif(_has_kdiffusion(), reason="k-diffusion is installed here")
def test_kdiffusion_peer_without_the_package_says_how_to_get_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(["overhead", "--peers", "diffusers,k-diffusion", "--methods", "ddim", "--batches", "1",
                   "--steps", "2", "--repeats", "1", "--out", str(tmp_path / "x.md")])
    assert e.value.code == 2 and PEER_INSTALL in capsys.readouterr().err


@pytest.mark.skipif(not _has_kdiffusion(), reason="k-diffusion is not installed (it is not a dependency of this "
                                                  "project; the overhead benchmark compares with it when present)")
@pytest.mark.peer
@pytest.mark.parametrize("key", sorted(perf.KDIFFUSION_SAMPLERS))
def test_kdiffusion_runner_counts_the_same_model_calls(key):
    ours, _ = perf.overhead_runners(key, batch=2, steps=TINY_STEPS, shape=TINY_SHAPE)
    theirs = perf.kdiffusion_runner(key, batch=2, steps=TINY_STEPS, shape=TINY_SHAPE)
    assert theirs().calls == ours().calls
