"""The fast paths added for GPU throughput, tested on the CPU: counter-based Philox noise (``rng="philox"``),
``solvers.accelerate`` (autocast, channels-last, torch.compile, CUDA-graph validation), ``--batch-size auto``
(bench.autobatch), the new bench.run flags and run settings, the performance studies' helpers
(bench.perf_studies) and bench.gpu_check's refusal without CUDA.

Everything runs on the CPU with tiny sizes and downloads nothing; the tests that need the offline assets
(ddpm_mnist, ResNet-20) skip with the reason when ``pretrained.checkpoints.ASSETS`` lacks them.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import pretrained
import solvers
from bench import autobatch
from bench import perf_studies as PS
from bench import run as run_mod
from bench.results import RUN_SETTING_DEFAULTS, IncompatibleResultsError
from pretrained.checkpoints import ASSETS
from solvers import noise as N
from solvers import schedules

M32 = 0xFFFFFFFF


# -- Philox4x32-10 ---------------------------------------------------------------------------------------------
def philox_reference(counter, key, rounds: int = 10) -> tuple[int, int, int, int]:
    """Philox4x32-``rounds`` on plain Python ints (Salmon et al. 2011 / Random123), one counter at a time."""
    c0, c1, c2, c3 = (int(v) for v in counter)
    k0, k1 = (int(v) for v in key)
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_torch(counter, key, rounds=10):
    words = N.philox4x32([torch.as_tensor(c, dtype=torch.int64) for c in counter],
                         [torch.as_tensor(k, dtype=torch.int64) for k in key], rounds=rounds)
    return tuple(int(w) for w in words)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert _philox_torch(counter, key) == expected
    assert philox_reference(counter, key) == expected  # the test's own reference is right too


def test_philox_vectorised_matches_a_scalar_reference_on_random_inputs():
    rng = random.Random(1234)
    n = 300
    ctr = [[rng.getrandbits(32) for _ in range(n)] for _ in range(4)]
    key = [[rng.getrandbits(32) for _ in range(n)] for _ in range(2)]
    # edge values: the largest words, where a 32-bit product overflows int64 if done naively
    for i, v in enumerate((M32, M32 - 1, 1 << 31, 0xFFFF0000, 0x0000FFFF)):
        for w in ctr + key:
            w[i] = v
    for rounds in (10, 7):
        got = N.philox4x32([torch.tensor(c, dtype=torch.int64) for c in ctr],
                           [torch.tensor(k, dtype=torch.int64) for k in key], rounds=rounds)
        got = torch.stack(got, dim=1)
        assert got.dtype == torch.int64 and got.shape == (n, 4)
        assert int(got.min()) >= 0 and int(got.max()) <= M32
        expected = [philox_reference([c[i] for c in ctr], [k[i] for k in key], rounds) for i in range(n)]
        assert got.tolist() == [list(e) for e in expected]


def test_philox_broadcasts_counters_against_keys():
    j = torch.arange(6, dtype=torch.int64).unsqueeze(0)          # (1, 6) counters
    k0 = torch.tensor([[3], [0xDEADBEEF]], dtype=torch.int64)     # (2, 1) keys
    k1 = torch.tensor([[5], [M32]], dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64)
    words = N.philox4x32((j, torch.full((), 9, dtype=torch.int64), zero, zero), (k0, k1))
    assert all(w.shape == (2, 6) for w in words)
    for r in range(2):
        for c in range(6):
            assert tuple(int(w[r, c]) for w in words) == philox_reference(
                (c, 9, 0, 0), (int(k0[r, 0]), int(k1[r, 0])))


# -- PhiloxStreams -----------------------------------------------------------------------------------------------
def test_philox_streams_row_depends_on_its_own_seed_only():
    for shape in [(3, 4), (5,), (1, 7, 3), (64,)]:
        alone = N.PhiloxStreams([7], 1).randn(shape, dtype=torch.float64)
        for seeds in ([5, 7], [7, 5, 3], [1, 2, 3, 4, 5, 6, 7], [7] * 9):
            batch = N.PhiloxStreams(seeds, 1).randn(shape, dtype=torch.float64)
            assert batch.shape == (len(seeds), *shape)
            for i, s in enumerate(seeds):
                if s == 7:
                    torch.testing.assert_close(batch[i], alone[0], rtol=0, atol=0)
    # and so through successive draws
    a, b = N.PhiloxStreams([5, 7], 1), N.PhiloxStreams([7], 1)
    for _ in range(3):
        torch.testing.assert_close(a.randn((10,), dtype=torch.float64)[1], b.randn((10,), dtype=torch.float64)[0],
                                   rtol=0, atol=0)


def test_philox_streams_are_deterministic_and_distinct():
    s = N.PhiloxStreams([0, 1], 1)
    first, second = s.randn((16,)), s.randn((16,))
    assert s.draws == 2
    assert not torch.equal(first, second)                     # successive draws differ
    assert not torch.equal(first[0], first[1])                # seeds differ
    again = N.PhiloxStreams([0, 1], 1)
    assert torch.equal(again.randn((16,)), first) and torch.equal(again.randn((16,)), second)  # reproducible
    other_stream = N.PhiloxStreams([0, 1], 0).randn((16,))
    assert not torch.equal(other_stream, first)               # stream 0 (x_T) ≠ stream 1 (solver noise)
    # the torch generators are a different generator
    assert not torch.equal(N.SeedStreams([0, 1], 1).randn((16,)), first)


def test_philox_streams_dtypes_and_devices():
    ref = N.PhiloxStreams([3, 4], 1).randn((2, 5), dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = N.PhiloxStreams([3, 4], 1).randn((2, 5), dtype=dtype)
        assert z.dtype == dtype and z.shape == (2, 2, 5)
        torch.testing.assert_close(z, ref.to(dtype), rtol=0, atol=0)  # one float64 draw, rounded
    assert N.PhiloxStreams([3, 4], 1).randn((2, 5)).dtype == torch.float32  # default
    z = N.PhiloxStreams([3, 4], 1).randn((2, 5), dtype=torch.float64, device=torch.device("cpu"))
    assert z.device.type == "cpu" and torch.equal(z, ref)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 9, 13])
def test_philox_streams_odd_sizes(n):
    s = N.PhiloxStreams([11, 12], 1)
    z = s.randn((n,), dtype=torch.float64)
    assert z.shape == (2, n) and torch.isfinite(z).all()
    # element j is a function of (seed, stream, draw, j): a shorter draw is a prefix of a longer one
    longer = N.PhiloxStreams([11, 12], 1).randn((n + 8,), dtype=torch.float64)
    assert torch.equal(z, longer[:, :n])
    # and the shape only arranges the elements
    if n % 3 == 0:
        assert torch.equal(N.PhiloxStreams([11, 12], 1).randn((3, n // 3), dtype=torch.float64).reshape(2, n), z)


def test_philox_normals_have_the_right_distribution():
    from scipy import stats

    z = N.PhiloxStreams(range(10), 1).randn((10_000,), dtype=torch.float64).reshape(-1).numpy()
    n = z.size
    assert n == 100_000
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n) and abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Box–Muller pairs (cos, sin of one radius) and neighbouring blocks are uncorrelated
    for lag in (1, 2, 4):
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 5 / np.sqrt(n), (lag, r)
    # the four words of a block each give a normal
    for lane in range(4):
        assert abs(z[lane::4].var() - 1) < 5 * np.sqrt(2 / (n / 4)), lane
    # 32-bit uniforms: |z| ≤ √(−2 log 2⁻³²)
    assert np.abs(z).max() <= np.sqrt(-2 * np.log(2.0 ** -32)) + 1e-12
    # different seeds are uncorrelated
    rows = N.PhiloxStreams(range(2), 1).randn((50_000,), dtype=torch.float64).numpy()
    assert abs(np.corrcoef(rows[0], rows[1])[0, 1]) < 5 / np.sqrt(50_000)


def test_make_streams_picks_the_generator():
    assert isinstance(N.make_streams([0, 1], 1, "torch"), N.SeedStreams)
    assert isinstance(N.make_streams([0, 1], 1, "philox"), N.PhiloxStreams)
    assert isinstance(N.make_streams([0, 1], 1), N.SeedStreams)  # default
    with pytest.raises(ValueError, match="unknown rng 'mt19937'; valid: torch, philox"):
        N.make_streams([0, 1], 1, "mt19937")
    assert N.RNGS == ("torch", "philox")


def test_initial_noise_with_philox():
    x = solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], rng="philox", dtype=torch.float64)
    assert x.shape == (4, 3, 2) and x.dtype == torch.float64
    assert torch.equal(x, N.PhiloxStreams([8, 9, 10, 11], N.STREAM_INITIAL).randn((3, 2), dtype=torch.float64))
    assert torch.equal(x, solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], rng="philox", dtype=torch.float64))
    # batch invariance
    assert torch.equal(x[2:3], solvers.initial_noise((1, 3, 2), seeds=[10], rng="philox", dtype=torch.float64))
    # not the torch generators' numbers
    assert not torch.equal(x, solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], dtype=torch.float64))
    # scaled by the prior's std (σ_max on EDM)
    edm = schedules.EDM()
    scaled = solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], rng="philox", schedule=edm, dtype=torch.float64)
    torch.testing.assert_close(scaled, x * float(edm.prior_std(edm.t_max)), rtol=1e-15, atol=0)
    assert float(edm.prior_std(edm.t_max)) > 10
    with pytest.raises(ValueError, match="unknown rng"):
        solvers.initial_noise((2, 3), rng="nope")


# -- solvers.sample(..., rng="philox") ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def gmm():
    return pretrained.get_card("gmm"), pretrained.load("gmm")


def _row_model(gmm, make_row_by_row):
    """gmm's exact network evaluated row by row: batch-invariant by construction."""
    m = gmm[1]
    return solvers.DiffusionModel(make_row_by_row(m.fn), schedule=m.schedule, prediction=m.prediction)


@pytest.mark.parametrize("solver", ["ddpm", "euler_maruyama"])
def test_sample_with_philox_is_batch_invariant_and_deterministic(gmm, make_row_by_row, solver):
    card, _ = gmm
    model = _row_model(gmm, make_row_by_row)
    shape = tuple(card.sample_shape)

    def run(seeds, rng="philox"):
        x = solvers.initial_noise((len(seeds), *shape), seeds, schedule=model.schedule, dtype=torch.float64, rng=rng)
        return solvers.sample(model, x, solver=solver, steps=4, seeds=seeds, rng=rng).samples

    a = run([3, 10, 11])
    b = run([10])
    c = run([11, 42, 10, 3])
    assert torch.isfinite(a).all()
    assert torch.equal(a[1], b[0]) and torch.equal(a[1], c[2])
    assert torch.equal(a[0], c[3]) and torch.equal(a[2], c[0])
    assert torch.equal(run([3, 10, 11]), a)                        # the same on every call
    assert not torch.equal(a[0], a[1])
    torch_rng = run([3, 10, 11], rng="torch")
    assert not torch.equal(torch_rng, a)


def test_sample_philox_changes_only_the_solver_noise(gmm, make_row_by_row, monkeypatch):
    card, _ = gmm
    model = _row_model(gmm, make_row_by_row)
    seeds = [0, 1, 2]
    x = solvers.initial_noise((3, *card.sample_shape), seeds, schedule=model.schedule, dtype=torch.float64)
    # the same x_T, only the solver's noise generator changes
    torch_res = solvers.sample(model, x, solver="ddpm", steps=3, seeds=seeds, rng="torch")
    calls = []
    real = solvers.loop.make_streams

    def spy(seed_list, stream, rng="torch"):
        calls.append((list(seed_list), stream, rng))
        return real(seed_list, stream, rng)

    monkeypatch.setattr(solvers.loop, "make_streams", spy)
    philox_res = solvers.sample(model, x, solver="ddpm", steps=3, seeds=seeds, rng="philox")
    assert calls == [(seeds, N.STREAM_SOLVER, "philox")]
    assert philox_res.nfe == torch_res.nfe == 3
    assert not torch.equal(philox_res.samples, torch_res.samples)
    # both are samples of the same law: same order of magnitude, and not far apart relative to the data scale
    assert 0.5 < float(philox_res.samples.std() / torch_res.samples.std()) < 2
    # a deterministic solver draws nothing: the generator makes no difference
    calls.clear()
    d1 = solvers.sample(model, x, solver="ddim", steps=3, seeds=seeds, rng="philox").samples
    assert calls == []
    assert torch.equal(d1, solvers.sample(model, x, solver="ddim", steps=3, seeds=seeds, rng="torch").samples)


def test_sample_refuses_an_unknown_rng(gmm):
    card, model = gmm
    x = solvers.initial_noise((2, *card.sample_shape), schedule=model.schedule, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown rng 'numpy'; valid: torch, philox"):
        solvers.sample(model, x, solver="ddpm", steps=2, rng="numpy")
    with pytest.raises(ValueError, match="unknown rng"):  # refused even where no noise is drawn
        solvers.sample(model, x, solver="ddim", steps=2, rng="")


# -- solvers.accelerate --------------------------------------------------------------------------------------
FM_KW = dict(solver="dpmpp_2m", steps=6, spacing="uniform", t_start=0.999)  # rectified flow: start below t = 1


@pytest.fixture(scope="module")
def fm():
    model = pretrained.load("fm_gmm2d")
    x = solvers.initial_noise((64, *pretrained.get_card("fm_gmm2d").sample_shape), range(64), schedule=model.schedule)
    return model, x, solvers.sample(model, x, **FM_KW)


def test_accelerate_returns_a_copy_with_a_fast_network(fm):
    model, x, ref = fm
    fn = model.fn
    fast = solvers.accelerate(model)
    assert fast is not model and isinstance(fast, solvers.DiffusionModel)
    assert isinstance(fast.fn, solvers.FastNetwork) and fast.fn.fn is fn
    assert model.fn is fn  # the original keeps its network
    assert fast.schedule is model.schedule and fast.prediction == model.prediction
    assert fast.fn.graphs == 0 and fast.fn.autocast is None and not fast.fn.channels_last
    res = solvers.sample(fast, x, **FM_KW)
    assert torch.equal(res.samples, ref.samples) and res.nfe == ref.nfe == 6


def test_compile_with_the_eager_backend_gives_identical_samples(fm):
    model, x, ref = fm
    fast = solvers.accelerate(model, compile=True, compile_backend="eager")
    res = solvers.sample(fast, x, **FM_KW)
    assert torch.equal(res.samples, ref.samples)
    assert res.nfe == ref.nfe and res.model_rows == ref.model_rows
    assert model.fn is fast.fn.fn and not isinstance(model.fn, solvers.FastNetwork)


def test_bf16_autocast_changes_the_samples_a_little(fm):
    model, x, ref = fm
    fast = solvers.accelerate(model, autocast="bf16")
    res = solvers.sample(fast, x, **FM_KW)
    assert res.samples.dtype == ref.samples.dtype == torch.float32  # the state keeps its precision
    assert res.nfe == ref.nfe
    diff = (res.samples - ref.samples).abs()
    scale = float(ref.samples.abs().max())
    assert float(diff.max()) > 1e-4                # bf16 rounding is visible ...
    assert float(diff.max()) < 0.05 * scale        # ... but small against the data (|x| ≈ 4)
    assert float(diff.pow(2).mean().sqrt()) < 0.01 * scale
    # the network's own output comes back in the dtype it was called with
    t = torch.full((4,), 0.5)
    assert fast.fn(x[:4], t).dtype == torch.float32
    assert model.fn is fast.fn.fn  # the original still runs in float32
    assert torch.equal(solvers.sample(model, x, **FM_KW).samples, ref.samples)


def test_accelerate_validates_its_options(fm):
    model = fm[0]
    with pytest.raises(ValueError, match="autocast must be None or one of bf16, fp16, got 'fp32'"):
        solvers.accelerate(model, autocast="fp32")
    with pytest.raises(ValueError, match="compile must be True/False or a torch.compile mode"):
        solvers.accelerate(model, compile="fastest")
    for mode in ("reduce-overhead", "max-autotune"):  # modes that capture CUDA graphs themselves
        with pytest.raises(ValueError, match=f"compile='{mode}' already captures CUDA graphs"):
            solvers.accelerate(model, compile=mode, cuda_graph=True)
        assert solvers.accel.compile_mode_uses_cudagraphs(mode)
    with pytest.raises(TypeError, match="takes a solvers.DiffusionModel, got function"):
        solvers.accelerate(lambda x, t: x)
    with pytest.raises(TypeError, match="DiffusionModel"):
        solvers.accelerate("gmm")
    # the valid ones are accepted (compilation is lazy: nothing is compiled here)
    for mode in ("default", "max-autotune-no-cudagraphs", True):
        assert not solvers.accel.compile_mode_uses_cudagraphs(mode)
        solvers.accelerate(model, compile=mode, cuda_graph=True)
    solvers.accelerate(model, compile="reduce-overhead")
    solvers.accelerate(model, autocast="fp16", compile=False)


def test_cuda_graph_on_the_cpu_is_refused_at_the_call(fm):
    model, x, _ = fm
    fast = solvers.accelerate(model, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        solvers.sample(fast, x, **FM_KW)
    assert fast.fn.graphs == 0


class TinyConv(nn.Module):
    """A two-layer conv ε-network over 3×8×8 images that records the memory format of its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        self.channels_last_inputs: list[bool] = []

    def forward(self, x, t):
        self.channels_last_inputs.append(x.is_contiguous(memory_format=torch.channels_last))
        h = torch.tanh(self.conv1(x) + (t / 1000.0).view(-1, 1, 1, 1))
        return self.conv2(h)


def test_channels_last_converts_the_module_in_place_and_keeps_the_output():
    # In float64: the channels-last convolution sums in another order, and DDIM's first step multiplies the
    # network's rounding by σ/α ≈ 160 at t = 999, so float32 differed by 2.5e-5 on an AMD EPYC (1e-6 on Intel).
    # In float64 the same reordering stays below 1e-12, so a tight tolerance still catches a wrong layout.
    net = TinyConv().double()
    model = solvers.DiffusionModel(net, schedule=schedules.DiscreteVP.linear(), prediction="eps")
    x = solvers.initial_noise((4, 3, 8, 8), range(4), schedule=model.schedule, dtype=torch.float64)
    ref = solvers.sample(model, x, solver="ddim", steps=3, dtype=torch.float64)
    weight = net.conv1.weight
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(net.channels_last_inputs)
    net.channels_last_inputs.clear()

    fast = solvers.accelerate(model, channels_last=True)
    assert fast.fn.fn is net and model.fn is net
    # in place: the same parameters, now laid out channels-last, same values
    assert net.conv1.weight is weight
    for conv in (net.conv1, net.conv2):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    res = solvers.sample(fast, x, solver="ddim", steps=3, dtype=torch.float64)
    assert res.nfe == ref.nfe == 3
    assert net.channels_last_inputs and all(net.channels_last_inputs)  # 4-D inputs passed channels-last
    torch.testing.assert_close(res.samples, ref.samples, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(res.samples).all() and float(res.samples.abs().max()) > 0.1


def test_channels_last_leaves_other_inputs_alone(fm):
    model, x, ref = fm
    fast = solvers.accelerate(model, channels_last=True)  # 2-D points: nothing to re-lay out
    assert torch.equal(solvers.sample(fast, x, **FM_KW).samples, ref.samples)


def test_accelerate_keeps_rows_per_sample():
    def cond_net(x, t, c):
        return x * 0.1 + c

    guided = solvers.classifier_free_guidance(cond_net, torch.ones(3, 2), torch.zeros(3, 2), scale=2.0)
    model = solvers.DiffusionModel(guided, schedule=schedules.VPLinear(), prediction="eps")
    fast = solvers.accelerate(model)
    assert fast.fn.rows_per_sample == 2 and fast.rows_per_sample == 2
    x = solvers.initial_noise((3, 2), schedule=model.schedule)
    a = solvers.sample(model, x, solver="ddim", steps=2)
    b = solvers.sample(fast, x, solver="ddim", steps=2)
    assert torch.equal(a.samples, b.samples) and b.model_rows == a.model_rows == 3 * 2 * 2


# -- bench.autobatch -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), (" auto ", "auto"), ("16", 16),
                                            (16, 16), ("1", 1), (" 8 ", 8)])
def test_parse_batch_size(text, expected):
    assert autobatch.parse_batch_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "x", "", "1.5", "16x", 0, -2, "autox"])
def test_parse_batch_size_refuses(text):
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        autobatch.parse_batch_size(text)


class SleepNet:
    """A fake network whose call takes ``cost(batch)`` seconds; records the batch sizes it saw."""

    def __init__(self, cost):
        self.cost = cost
        self.batches: list[int] = []

    def __call__(self, x, t):
        self.batches.append(x.shape[0])
        time.sleep(self.cost(x.shape[0]))
        return torch.zeros_like(x)


def _sleep_model(cost):
    net = SleepNet(cost)
    return solvers.DiffusionModel(net, schedule=schedules.VPLinear(), prediction="eps"), net


@pytest.mark.parametrize("cap", [64, 50])
def test_auto_batch_on_cpu_takes_the_cap_when_a_call_costs_the_same_at_any_batch(single_thread, cap):
    model, net = _sleep_model(lambda n: 0.005)
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=cap)
    assert chosen.batch_size == cap
    assert max(net.batches) == cap
    assert "on cpu" in chosen.note and f"{cap}:" in chosen.note


def test_auto_batch_on_cpu_stops_where_throughput_stops_growing(single_thread):
    model, net = _sleep_model(lambda n: 2e-4 * max(n, 16))  # fixed cost up to 16 samples, then linear
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=4096)
    assert 16 <= chosen.batch_size <= 64, chosen.note
    assert max(net.batches) <= 256, chosen.note  # two doublings without gain end the search


def test_auto_batch_on_cpu_stops_when_a_call_exceeds_the_budget(single_thread):
    model, net = _sleep_model(lambda n: 0.005 * n)
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=4096, cpu_call_budget_s=0.02)
    assert chosen.batch_size <= 8 and max(net.batches) <= 8, chosen.note


def test_auto_batch_never_exceeds_the_cap_and_checks_its_arguments(single_thread):
    model, net = _sleep_model(lambda n: 0.0)
    assert autobatch.auto_batch_size(model, (2,), "cpu", cap=1).batch_size == 1
    assert set(net.batches) == {1}
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=3)
    assert 1 <= chosen.batch_size <= 3 and max(net.batches) <= 3
    for cap in (0, -1):
        with pytest.raises(ValueError, match="cap must be positive"):
            autobatch.auto_batch_size(model, (2,), "cpu", cap=cap)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="memory_fraction"):
            autobatch.auto_batch_size(model, (2,), "cpu", cap=4, memory_fraction=fraction)


# -- bench.run: the new flags and run settings ----------------------------------------------------------------
QUICK = ["--quiet", "--model", "gmm2d", "--num-samples", "40", "--solvers", "ddim,ddpm", "--steps", "1,2",
         "--metric", "fd_data"]


def _results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")


def _preview(out: Path, cell_id: str) -> np.ndarray:
    with np.load(out / "previews" / f"{cell_id}.npz") as z:
        return z["data"]


@pytest.fixture(scope="module")
def bf16_philox_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fast") / "bf16_philox"
    assert run_mod.run(["--out", str(out), *QUICK, "--autocast", "bf16", "--rng", "philox"]) == out
    return out


def test_run_records_the_network_and_rng_settings(bf16_philox_run):
    df = _results(bf16_philox_run)
    assert len(df) == 4 and (df["status"] == "ok").all()
    assert (df["network"] == "autocast=bf16").all()
    assert (df["rng"] == "philox").all()
    md = (bf16_philox_run / "report.md").read_text()
    assert "network call: autocast=bf16" in md
    assert "noise: philox generators" in md


def test_run_rng_changes_the_samples(bf16_philox_run, tmp_path):
    out = tmp_path / "torch_rng"
    run_mod.run(["--out", str(out), *QUICK, "--autocast", "bf16", "--no-report"])
    a, b = _results(bf16_philox_run), _results(out)
    assert (b["rng"] == "torch").all() and (b["network"] == "autocast=bf16").all()
    assert list(a["cell_key"]) == list(b["cell_key"])  # the same cells ...
    for cid in a["cell_id"]:
        assert not np.array_equal(_preview(bf16_philox_run, cid), _preview(out, cid))  # ... other noise


def test_default_run_records_the_default_settings(tmp_path):
    out = tmp_path / "default"
    run_mod.run(["--out", str(out), *QUICK, "--no-report"])
    df = _results(out)
    assert RUN_SETTING_DEFAULTS == {"network": "eager", "rng": "torch"}
    assert (df["network"] == "eager").all() and (df["rng"] == "torch").all()


def test_batch_size_auto_records_an_integer_batch(tmp_path, single_thread):
    out = tmp_path / "auto"
    run_mod.run(["--out", str(out), *QUICK, "--batch-size", "auto", "--no-report"])
    df = _results(out)
    assert (df["status"] == "ok").all()
    assert pd.api.types.is_integer_dtype(df["batch_size"])
    bs = set(df["batch_size"])
    assert len(bs) == 1 and 1 <= next(iter(bs)) <= 40


def test_a_different_network_setting_is_refused_and_the_file_kept(tmp_path, capsys):
    out = tmp_path / "mixed"
    args = ["--out", str(out), *QUICK[:-4], "--steps", "1", "--metric", "fd_data", "--no-report"]
    run_mod.run(args)
    before = (out / "results.csv").read_bytes()
    with pytest.raises(IncompatibleResultsError, match=r"network: eager in the file vs autocast=bf16 now"):
        run_mod.run([*args, "--autocast", "bf16"])
    assert (out / "results.csv").read_bytes() == before
    with pytest.raises(IncompatibleResultsError, match=r"rng: torch in the file vs philox now"):
        run_mod.run([*args, "--rng", "philox"])
    assert (out / "results.csv").read_bytes() == before
    capsys.readouterr()
    assert run_mod.main([*args, "--channels-last"]) == 2
    assert "network: eager in the file vs channels_last now" in capsys.readouterr().err
    assert (out / "results.csv").read_bytes() == before


def test_a_results_file_from_before_the_new_settings_is_extended(tmp_path):
    out = tmp_path / "old_file"
    base = ["--out", str(out), "--quiet", "--model", "gmm2d", "--num-samples", "20", "--solvers", "ddim",
            "--metric", "fd_data", "--no-report"]
    run_mod.run([*base, "--steps", "1"])
    old = _results(out).drop(columns=["network", "rng"])
    old.to_csv(out / "results.csv", index=False)
    # a default run resumes it ...
    run_mod.run([*base, "--steps", "1,2"])
    df = _results(out)
    assert len(df) == 2 and list(df["steps"]) == [1, 2] and (df["status"] == "ok").all()
    assert df.loc[df["steps"] == 2, "network"].tolist() == ["eager"]
    # ... and the table it wrote (old rows without the settings, new rows with them) is extended again
    run_mod.run([*base, "--steps", "1,2,3"])
    df = _results(out)
    assert list(df["steps"]) == [1, 2, 3]
    # a non-default setting is still refused against the old rows
    before = (out / "results.csv").read_bytes()
    with pytest.raises(IncompatibleResultsError, match="rng"):
        run_mod.run([*base, "--steps", "1,2,3,4", "--rng", "philox"])
    assert (out / "results.csv").read_bytes() == before
    # and so against a file that lacks the columns altogether
    old.to_csv(out / "results.csv", index=False)
    with pytest.raises(IncompatibleResultsError, match=r"network: \(missing in the file\) vs 'autocast=bf16'"):
        run_mod.run([*base, "--steps", "1,2", "--autocast", "bf16"])


@pytest.mark.parametrize("args, message", [
    (["--cuda-graph"], "--cuda-graph needs a CUDA device; this run is on cpu"),
    (["--batch-size", "0"], "--batch-size must be a positive integer or 'auto', got 0"),
    (["--batch-size", "foo"], "--batch-size must be a positive integer or 'auto', got 'foo'"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer or 'auto'"),
    (["--compile", "fastest"], "compile must be True/False or a torch.compile mode"),
])
def test_bad_fast_path_flags_are_usage_errors(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    with pytest.raises(run_mod.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_mod.run(["--out", str(out), "--device", "cpu", *QUICK, *args])
    assert run_mod.main(["--out", str(out), "--device", "cpu", *QUICK, *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--autocast", "fp32"], ["--rng", "mt19937"]])
def test_fast_path_flags_have_fixed_choices(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_mod.build_parser().parse_args(args)
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_network_setting_names_every_fast_path():
    def ns(**kw):
        base = dict(autocast=None, channels_last=False, compile=None, cuda_graph=False)
        return argparse.Namespace(**{**base, **kw})

    assert run_mod.network_setting(ns()) == "eager"
    assert run_mod.network_setting(ns(autocast="bf16")) == "autocast=bf16"
    assert run_mod.network_setting(ns(autocast="fp16", channels_last=True, compile="default", cuda_graph=True)) == \
        "autocast=fp16,channels_last,compile=default,cuda_graph"
    assert run_mod.network_setting(ns(compile="max-autotune")) == "compile=max-autotune"
    p = run_mod.build_parser()
    assert p.parse_args(["--compile"]).compile == "default"
    assert p.parse_args(["--compile", "max-autotune"]).compile == "max-autotune"
    assert p.parse_args([]).compile is None and p.parse_args([]).rng == "torch"


# -- bench.perf_studies --------------------------------------------------------------------------------------
def test_linear_fit_on_a_line_and_on_noise():
    x = [1.0, 2.0, 4.0, 8.0, 16.0]
    fit = PS.linear_fit(x, [0.5 + 3.0 * v for v in x])
    assert fit["slope"] == pytest.approx(3.0, abs=1e-12) and fit["intercept"] == pytest.approx(0.5, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    two = PS.linear_fit([2, 5], [1, 7])
    assert two["slope"] == pytest.approx(2.0) and two["intercept"] == pytest.approx(-3.0) and two["r2"] == pytest.approx(1.0)
    flat = PS.linear_fit([1, 2, 3], [4, 4, 4])  # a constant: no variance to explain
    assert flat["slope"] == pytest.approx(0.0, abs=1e-12) and flat["r2"] == 1.0
    rng = np.random.default_rng(0)
    xs = np.arange(20.0)
    ys = 1.0 + 2.0 * xs + rng.normal(0, 3.0, xs.size)
    noisy = PS.linear_fit(xs, ys)
    assert 0.5 < noisy["r2"] < 1.0
    assert noisy["slope"] == pytest.approx(2.0, abs=0.5)
    b, a = np.polyfit(xs, ys, 1)
    resid = ys - (a + b * xs)
    assert noisy["r2"] == pytest.approx(1 - resid @ resid / ((ys - ys.mean()) @ (ys - ys.mean())), rel=1e-12)
    for bad in ([], [1.0]):
        with pytest.raises(ValueError, match="at least two points"):
            PS.linear_fit(bad, bad)


def test_random_inception_weights_load_in_torch_fidelity(tmp_path, single_thread):
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = fe.load_state_dict_from_url
    path = PS.random_inception_weights(tmp_path / "inception-random.pth")
    assert path == tmp_path / "inception-random.pth" and path.stat().st_size > 50 * 2**20
    assert fe.load_state_dict_from_url is original  # the patch is undone
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) > 100 and all(torch.isfinite(v.float()).all() for v in state.values())
    model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=str(path)).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (feats,) = model(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert not torch.equal(feats[0], feats[1])


needs_mnist_assets = pytest.mark.skipif(
    not ((ASSETS / "ddpm_mnist").is_dir() and (ASSETS / "resnet20_cifar").is_dir()),
    reason=f"{ASSETS}/ddpm_mnist or {ASSETS}/resnet20_cifar is absent (offline ddpm_mnist weights and "
           "ResNet-20 features are needed)")


@needs_mnist_assets
def test_run_scaling_on_ddpm_mnist(single_thread):
    res = PS.run_scaling("ddpm_mnist", samples=(4, 16), steps=(1, 4), batch=4, fixed_steps=1, progress=False)
    assert [r["n"] for r in res["by_samples"]] == [4, 16]
    assert [r["steps"] for r in res["by_steps"]] == [1, 4]
    assert res["steps_samples"] == 4 and res["metric"] == "fd_resnet20" and res["autocast"] is None
    for key in ("fit_sampling_samples", "fit_features_samples", "fit_sampling_steps"):
        fit = res[key]
        assert fit["slope"] > 0, (key, fit)
        assert fit["r2"] == pytest.approx(1.0)  # two points
    for r in res["by_samples"]:
        assert r["sampling_s"] > 0 and r["features_s"] > 0
    text = PS.format_scaling(res, "python -m bench.perf scaling --test", "a test machine")
    assert text.startswith("Command: `python -m bench.perf scaling --test`")
    for header in ("| samples | sampling s | feature extraction s | sampling share |", "| steps | sampling s | s per step |",
                   "| what | a (s) | b | R² |", "| samples | steps | sampling s | features s | sampling share |"):
        assert header in text
    assert "| 4 | " in text and "| 16 | " in text and "ResNet-20" in text and "eager float32" in text


def test_format_scaling_numbers():
    res = {"model": "ddpm_mnist", "solver": "ddim", "fixed_steps": 10, "batch": 100, "metric": "fid",
           "device": "cpu", "inception_random": True, "autocast": "bf16", "cuda_graph": True, "steps_samples": 100,
           "by_samples": [{"n": 100, "sampling_s": 3.0, "features_s": 1.0}, {"n": 200, "sampling_s": 6.0, "features_s": 2.0}],
           "by_steps": [{"steps": 5, "sampling_s": 1.5}, {"steps": 10, "sampling_s": 3.0}]}
    res["fit_sampling_samples"] = PS.linear_fit([100, 200], [3.0, 6.0])
    res["fit_features_samples"] = PS.linear_fit([100, 200], [1.0, 2.0])
    res["fit_sampling_steps"] = PS.linear_fit([5, 10], [1.5, 3.0])
    text = PS.format_scaling(res, "cmd", "machine", project_n=(10_000,), project_steps=(10,))
    assert "| 100 | 3.000 | 1.000 | 75.0% |" in text
    assert "| 10 | 3.000 | 0.3000 |" in text
    assert "| sampling vs samples | 0.0000 | 30.0000 ms per sample | 1.00000 |" in text
    # 10,000 samples × 10 steps: 3 ms per sample per step → 300 s; features 0.01 s per sample → 100 s
    assert "| 10,000 | 10 | 300 | 100 | 75.0% |" in text
    assert "autocast bf16, CUDA graph" in text and "random weights: timing only" in text


def test_format_quality_change_column():
    rows = [
        {"model": "ddpm_mnist", "seed_spread": 0.05, "solver": "ddim", "steps": 10, "spacing": "trailing",
         "metric": "FD-ResNet-20", "float32": 2.0, "autocast": 2.2, "rms_diff": 1e-3, "n": 1000},
        {"model": "fm_gmm2d", "solver": "dpmpp_2m", "steps": 50, "spacing": "uniform",
         "metric": "RMS error vs the exact gmm2d PF-ODE", "float32": 0.04, "autocast": 0.038, "rms_diff": 2.5e-2,
         "n": 2000},
    ]
    text = PS.format_quality(rows, "python -m bench.perf quality", "machine")
    lines = text.splitlines()
    assert "| model | solver | steps | metric | float32 | bf16 | change | seed spread | RMS diff | samples |" in lines
    assert "| ddpm_mnist | ddim | 10 | FD-ResNet-20 | 2 | 2.2 | +10.0% | 0.05 | 1.00e-03 | 1,000 |" in lines
    assert ("| fm_gmm2d | dpmpp_2m | 50 | RMS error vs the exact gmm2d PF-ODE | 0.04 | 0.038 | -5.0% | – | "
            "2.50e-02 | 2,000 |") in lines
    assert "under fp16 autocast" in PS.format_quality(rows, "c", "m", autocast="fp16")


# -- bench.gpu_check -------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: gpu_check would run its checks")
def test_gpu_check_refuses_without_cuda(capsys):
    from bench import gpu_check

    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2
    assert "no CUDA device here" in capsys.readouterr().err


# -- the review fixes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("total, most, expected", [(1001, 1000, 501), (50_000, 4096, 3847), (10, 64, 10),
                                                   (300, 128, 100), (1024, 1024, 1024), (7, 1, 1)])
def test_auto_batch_splits_the_samples_evenly(total, most, expected):
    """The auto batch is at most the memory bound and splits the samples into batches of (nearly) one size."""
    n = autobatch._even(total, most)
    assert n == expected and n <= most
    batches = -(-total // n)
    assert batches == -(-total // most)           # no more batches than the bound needs
    assert total - (batches - 1) * n >= n - batches  # the last batch is not short by more than the rounding


def test_run_refuses_graphs_and_compile_for_the_adaptive_solver(tmp_path):
    for flag in (["--compile"], ["--cuda-graph", "--device", "cpu"]):
        with pytest.raises(run_mod.UsageError):
            run_mod.run(["--out", str(tmp_path / "x"), "--solvers", "adaptive", "--steps", "2", "--num-samples", "8",
                         "--quiet", "--no-report", *flag])
    assert not (tmp_path / "x" / "results.csv").exists()
    with pytest.raises(run_mod.UsageError, match="adaptive solver calls the network on a varying number of rows"):
        run_mod.run(["--out", str(tmp_path / "y"), "--solvers", "ddim,adaptive", "--steps", "2", "--num-samples", "8",
                     "--quiet", "--no-report", "--compile"])


class TimeRecorder:
    """A network that records the time tensors it is given (and returns 0.1·x)."""

    def __init__(self):
        self.ts = []

    def __call__(self, x, t):
        self.ts.append(t)
        return 0.1 * x


def test_the_grid_time_table_is_contiguous_cached_with_the_grid_and_exact():
    """Grid points get rows of one (points × batch) table made once per grid, device, dtype and batch: ordinary
    contiguous (batch,) tensors holding exactly what a per-call fill would hold; off-grid points a fresh fill."""
    sched = schedules.DiscreteVP.linear(1000)
    rec = TimeRecorder()
    model = solvers.DiffusionModel(rec, schedule=sched, prediction="eps")
    x = torch.randn(5, 3)
    res = solvers.sample(model, x, solver="ddim", steps=6, spacing="trailing")
    assert len(rec.ts) == 6
    expected = [float(sched.model_time(torch.tensor([t], dtype=torch.float64))[0]) for t in res.timesteps[:-1]]
    for t, e in zip(rec.ts, expected):
        assert t.shape == (5,) and t.is_contiguous() and t.dtype == x.dtype
        assert torch.equal(t, torch.full((5,), e, dtype=x.dtype))
    assert all(t.untyped_storage().nbytes() == 7 * 5 * t.element_size() for t in rec.ts)  # rows of one table
    first = [t.data_ptr() for t in rec.ts]
    rec.ts.clear()
    solvers.sample(model, x, solver="ddim", steps=6, spacing="trailing")
    assert [t.data_ptr() for t in rec.ts] == first          # the same table: made once for this grid
    rec.ts.clear()
    solvers.sample(model, torch.randn(4, 3), solver="ddim", steps=6, spacing="trailing")
    assert rec.ts[0].shape == (4,) and rec.ts[0].data_ptr() not in first  # another batch size, another table
    # off-grid points (DPM-Solver++(2S) midpoints) still get a fresh tensor per call
    rec.ts.clear()
    solvers.sample(model, x, solver="dpmpp_2s", steps=3)
    assert len(rec.ts) == 5 and all(t.shape == (5,) and t.is_contiguous() for t in rec.ts)


def test_a_large_grid_time_table_falls_back_to_a_fill_per_call(monkeypatch):
    from solvers import base
    monkeypatch.setattr(base, "TIME_TABLE_MAX", 10)
    rec = TimeRecorder()
    model = solvers.DiffusionModel(rec, schedule=schedules.DiscreteVP.linear(1000), prediction="eps")
    x = torch.randn(5, 3)
    solvers.sample(model, x, solver="ddim", steps=6, spacing="trailing")
    solvers.sample(model, x, solver="ddim", steps=6, spacing="trailing")
    assert len(rec.ts) == 12
    # fresh (batch,) fills, not rows of a shared (points × batch) table
    assert all(t.untyped_storage().nbytes() == 5 * t.element_size() for t in rec.ts)


def test_scaling_needs_two_values_of_samples_and_steps(tmp_path):
    from bench import perf
    with pytest.raises(SystemExit) as e:
        perf.main(["scaling", "--samples", "4", "--steps", "1,2", "--out", str(tmp_path / "s.md")])
    assert e.value.code == 2
    assert not (tmp_path / "s.md").exists()


def test_consistency_class_labels_are_made_once_per_batch_and_device():
    """The class-conditional wrapper keeps its labels on the device (no host→device copy per network call, which
    CUDA-graph capture forbids) and remakes them when the labels asked for change."""
    from types import SimpleNamespace

    from pretrained.consistency import ClassConditionalUNet

    unet = torch.nn.Identity()
    unet.config = SimpleNamespace(num_class_embeds=10)
    wrapper = ClassConditionalUNet(unet, class_labels=None, label_seed=3)
    a = wrapper.labels(6, "cpu")
    assert wrapper.labels(6, "cpu") is a and a.shape == (6,) and int(a.max()) < 10
    assert torch.equal(a, wrapper._make_labels(6))
    wrapper.class_labels = 7
    assert torch.equal(wrapper.labels(6, "cpu"), torch.full((6,), 7))
    wrapper.class_labels = [1, 2]
    assert wrapper.labels(2, "cpu").tolist() == [1, 2]
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        wrapper.labels(3, "cpu")
