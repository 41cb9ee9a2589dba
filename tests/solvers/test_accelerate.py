"""``solvers.accelerate`` (autocast, channels-last, torch.compile, CUDA-graph validation) and the sampling loop's
grid time table, tested on the CPU with tiny sizes."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import pretrained
import solvers
from solvers import schedules


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
