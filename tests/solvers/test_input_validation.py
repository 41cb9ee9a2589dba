"""Bad input to the public entry points is refused up front, with a message saying what was given and what
would be accepted: state dtypes and shapes, dtype arguments, step counts, grid ends, what the model returns,
and non-finite model output under the adaptive solver."""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch

import solvers
from pretrained.analytic import gmm_nd
from solvers import grids, schedules

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULE = schedules.VPLinear()
MIXTURE = gmm_nd(dim=4, n_components=3, seed=1)
ACCEPTED = r"accepted: torch.float16, torch.bfloat16, torch.float32 or torch.float64"


class CountingNet:
    """The exact mixture's ε-network evaluated row by row (so batch-invariant by construction), counting its
    calls (to show that errors come before any)."""

    def __init__(self):
        self.net = MIXTURE.network(SCHEDULE, "eps")
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return torch.cat([self.net(x[i:i + 1], t[i:i + 1]) for i in range(x.shape[0])])


@pytest.fixture
def counted():
    net = CountingNet()
    return net, solvers.DiffusionModel(net, schedule=SCHEDULE, prediction="eps")


def x_T(n=3, dtype=torch.float64):
    return solvers.initial_noise((n, 4), schedule=SCHEDULE, dtype=dtype)


# -- dtypes of states and dtype arguments ------------------------------------------------------------


@pytest.mark.parametrize("bad", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.complex128])
def test_sample_and_invert_refuse_a_state_that_is_not_real_floating(bad, counted):
    """An int/bool/complex x_T (or x0) raises TypeError naming its dtype; before, it was truncated silently."""
    net, model = counted
    state = torch.ones(3, 4).to(bad)
    with pytest.raises(TypeError, match=f"x_T must be a real floating tensor .* got {bad}"):
        solvers.sample(model, state, "euler", 3)
    with pytest.raises(TypeError, match=f"x0 must be a real floating tensor .* got {bad}"):
        solvers.invert(model, state, "ddim", 3)
    assert net.calls == 0


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64])
def test_dtype_arguments_must_be_real_floating(bad, counted):
    """sample/invert/initial_noise(dtype=int64 …) and DiffusionModel(input_dtype=…) raise TypeError."""
    net, model = counted
    with pytest.raises(TypeError, match=f"dtype={bad} is not a real floating dtype.*{ACCEPTED}"):
        solvers.sample(model, x_T(), "euler", 3, dtype=bad)
    with pytest.raises(TypeError, match=f"dtype={bad} is not a real floating dtype"):
        solvers.invert(model, x_T(), "ddim", 3, dtype=bad)
    with pytest.raises(TypeError, match=f"dtype={bad} is not a real floating dtype"):
        solvers.initial_noise((2, 3), dtype=bad)
    with pytest.raises(TypeError, match=f"input_dtype={bad} is not a real floating dtype"):
        solvers.DiffusionModel(net, schedule=SCHEDULE, input_dtype=bad)
    assert net.calls == 0


@pytest.mark.parametrize("name, dtype", [("float64", torch.float64), ("torch.float64", torch.float64),
                                         ("double", torch.float64), ("float32", torch.float32),
                                         ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_names_are_accepted_for_the_dtype_they_name(name, dtype, counted):
    """A dtype given by name works as the dtype itself (before: torch's 'Invalid device string')."""
    _, model = counted
    assert solvers.initial_noise((2, 3), dtype=name).dtype == dtype
    assert torch.equal(solvers.initial_noise((2, 3), dtype=name), solvers.initial_noise((2, 3), dtype=dtype))
    assert solvers.DiffusionModel(lambda x, t: x, schedule=SCHEDULE, input_dtype=name).input_dtype == dtype
    if dtype in (torch.float32, torch.float64):
        by_name = solvers.sample(model, x_T(dtype=torch.float32), "dpmpp_2m", 4, dtype=name)
        by_dtype = solvers.sample(model, x_T(dtype=torch.float32), "dpmpp_2m", 4, dtype=dtype)
        assert by_name.samples.dtype == dtype
        assert torch.equal(by_name.samples, by_dtype.samples)
        assert solvers.invert(model, x_T(), "ddim", 3, dtype=name).samples.dtype == dtype


@pytest.mark.parametrize("bad", ["int64", "float8", "cuda", 64, np.float64])
def test_other_dtype_values_raise_listing_the_accepted_ones(bad, counted):
    """Names of other dtypes, and things that are not dtypes at all, raise TypeError listing what is accepted."""
    _, model = counted
    with pytest.raises(TypeError, match=ACCEPTED):
        solvers.sample(model, x_T(), "euler", 3, dtype=bad)
    with pytest.raises(TypeError, match=ACCEPTED):
        solvers.initial_noise((2, 3), dtype=bad)


# -- shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, message", [
    ((-1, 2), r"shape=\(-1, 2\) has a dimension of -1"),
    ((0, 2), r"shape=\(0, 2\) has a dimension of 0"),
    ((2, 0), r"shape=\(2, 0\) has a dimension of 0"),
    ((2, -3), r"shape=\(2, -3\) has a dimension of -3"),
    ((2.5, 2), "shape must hold integers, got 2.5"),
    ((True, 2), "shape must hold integers, got True"),
    (4, "shape must be a sequence of dimensions, batch first"),
    ((), "shape must include the batch dimension"),
])
def test_initial_noise_refuses_empty_negative_and_non_integer_shapes(shape, message):
    """initial_noise((-1, 2)) used to return an empty tensor, (2, -1) a torch RuntimeError, (2.5, 2) a batch of 2."""
    with pytest.raises(ValueError, match=message):
        solvers.initial_noise(shape)


def test_initial_noise_accepts_sizes_and_integer_arrays():
    """torch.Size, NumPy integers and 1-D integer arrays/tensors are shapes too."""
    for shape in (torch.Size([2, 3]), (np.int64(2), 3), np.array([2, 3]), torch.tensor([2, 3])):
        assert solvers.initial_noise(shape).shape == (2, 3)


def test_a_state_with_an_empty_dimension_is_refused(counted):
    """x_T of shape (2, 0) raises ValueError (before, it 'sampled' an empty tensor)."""
    net, model = counted
    with pytest.raises(ValueError, match=r"x_T has a zero-size dimension \(shape \(2, 0\)\)"):
        solvers.sample(model, torch.zeros(2, 0), "euler", 3)
    with pytest.raises(ValueError, match="x_T must be a tensor with a batch dimension.*got list"):
        solvers.sample(model, [[0.0, 1.0]], "euler", 3)
    assert net.calls == 0


# -- steps and grid ends -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [100_001, 10 ** 7, 2 ** 63])
def test_steps_above_the_limit_raise_at_once(steps, counted):
    """steps=10**7 used to end in a MemoryError after 14 s, 2**63 in an IndexError: now a ValueError up front."""
    net, model = counted
    message = f"steps={steps} is above the limit of 100,000 steps"
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        solvers.sample(model, x_T(), "euler", steps)
    with pytest.raises(ValueError, match=message):
        solvers.invert(model, x_T(), "ddim", steps)
    with pytest.raises(ValueError, match=message):
        grids.make_grid(SCHEDULE, steps)
    assert time.perf_counter() - t0 < 5.0  # no grid was built (10⁷ points took 14 s and then failed)
    assert net.calls == 0


def test_the_step_limit_itself_is_accepted():
    """MAX_STEPS is a usable count (the bound is generous, not tight)."""
    assert grids.MAX_STEPS == 100_000
    grid = grids.make_grid(SCHEDULE, grids.MAX_STEPS)
    assert len(grid) == grids.MAX_STEPS + 1 and grid[-1] == SCHEDULE.t_zero


@pytest.mark.parametrize("steps", [2.0, True, np.float64(2)])
def test_steps_given_with_timesteps_must_be_an_integer(steps, counted):
    """steps must be a positive int even when it only confirms an explicit grid's length."""
    _, model = counted
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        solvers.sample(model, x_T(), "euler", steps, timesteps=[0.9, 0.5, 0.0])


@pytest.mark.parametrize("denoise_to_zero", [True, False])
def test_logsnr_spacing_to_t_end_zero_says_t_end_must_be_above_t_zero(denoise_to_zero, counted):
    """t_end=0 with logsnr spacing: the message is about t_end and log-SNR (it was about grid points)."""
    net, model = counted
    with pytest.raises(ValueError, match=r"t_end must be > t_zero = 0.0 for log-SNR spacing: .* inf at "
                                         r"t_end=0.0 .*use denoise_to_zero=True with t_end > t_zero"):
        solvers.sample(model, x_T(), "euler", 4, t_end=0, denoise_to_zero=denoise_to_zero)
    assert net.calls == 0


def test_logsnr_spacing_from_where_alpha_vanishes_suggests_a_start_or_a_spacing():
    """Rectified flow's default start t = 1 has α = 0 (λ = −∞): log-SNR spacing cannot place it, and the
    message says so with a start that works and the spacing that does (it was 'timesteps must be finite, got
    [1.0, nan, …]')."""
    rf = schedules.RectifiedFlow()
    model = gmm_nd(dim=4, n_components=3, seed=1).as_model(rf, "velocity")
    x = solvers.initial_noise((2, 4), seeds=range(2), schedule=rf)
    with pytest.raises(ValueError, match=r"finite log-SNR .* at t_start=1.0 on RectifiedFlow .*"
                                         r"t_start=0.999\b.* spacing='uniform'"):
        solvers.sample(model, x, "dpmpp_2m", 5)
    res = solvers.sample(model, x, "dpmpp_2m", 5, t_start=0.999)
    assert res.timesteps[0] == 0.999 and bool(torch.isfinite(res.samples).all())


def test_other_spacings_to_t_zero_need_denoise_to_zero_off(counted):
    """With denoise_to_zero=True a t_end at t_zero would repeat the last point: a message says so.  With it
    off, a spacing that can place σ = 0 (karras, uniform) ends its grid there."""
    _, model = counted
    for spacing in ("karras", "uniform", "quadratic"):
        with pytest.raises(ValueError, match=r"t_end=0.0 is not above t_zero=0.0 .* denoise_to_zero=False"):
            grids.make_grid(SCHEDULE, 4, spacing=spacing, t_end=0.0)
        grid = grids.make_grid(SCHEDULE, 4, spacing=spacing, t_end=0.0, denoise_to_zero=False)
        assert len(grid) == 5 and grid[-1] == 0.0 and grid[0] == SCHEDULE.t_max


def test_make_grid_rho_must_be_a_positive_finite_number():
    """rho=nan passed the old `rho <= 0` test and gave a NaN grid's error; now every bad rho names itself."""
    for rho in (math.nan, math.inf, 0.0, -1.0, True):
        with pytest.raises(ValueError, match=f"make_grid: rho must be in \\(0, inf\\) and finite, got {rho}"):
            grids.make_grid(SCHEDULE, 4, spacing="karras", rho=rho)


@pytest.mark.parametrize("flag", ["no", "False", 0, 1, None, 1.0])
def test_denoise_to_zero_must_be_a_bool(flag, counted):
    """denoise_to_zero="no" (or 0/1/None) was read for its truth value — "no" and "False" ended at σ = 0 as True
    would; now make_grid and sample refuse it before any model call, saying what is accepted."""
    net, model = counted
    with pytest.raises(TypeError, match=rf"denoise_to_zero must be True or False, got {re.escape(repr(flag))}"):
        grids.make_grid(SCHEDULE, 4, denoise_to_zero=flag)
    with pytest.raises(TypeError, match=rf"denoise_to_zero must be True or False, got {re.escape(repr(flag))}"):
        solvers.sample(model, x_T(), "euler", 3, denoise_to_zero=flag)
    assert net.calls == 0
    assert grids.make_grid(SCHEDULE, 4, denoise_to_zero=np.bool_(False)) == grids.make_grid(
        SCHEDULE, 4, denoise_to_zero=False)


@pytest.mark.parametrize("entry", ["sample", "invert"])
@pytest.mark.parametrize("callback", [3, "print", [print]])
def test_a_callback_that_is_not_callable_is_refused_before_the_first_step(entry, callback, counted):
    """Before, sample and invert ran the first step (a model call), then failed with "'int' object is not
    callable"."""
    net, model = counted
    with pytest.raises(TypeError, match=rf"callback must be None or callable as callback\(info: StepInfo\), got "
                                        rf"{type(callback).__name__} {re.escape(repr(callback))}"):
        if entry == "sample":
            solvers.sample(model, x_T(), "euler", 3, callback=callback)
        else:
            solvers.invert(model, x_T(), "ddim", 3, callback=callback)
    assert net.calls == 0


@pytest.mark.parametrize("rows", [0, -2, 2.5, True, "2"])
def test_rows_per_sample_must_be_a_positive_integer(rows):
    """rows_per_sample (network rows per sample in one call) counts SampleResult.model_rows: 0 silently became 1,
    −2 gave negative row counts and 2.5 was truncated to 2; now each is refused, argument or fn attribute."""
    with pytest.raises(ValueError, match=rf"rows_per_sample must be a positive integer .*got {re.escape(repr(rows))}"):
        solvers.DiffusionModel(lambda x, t: x, schedule=SCHEDULE, rows_per_sample=rows)

    def fn(x, t):
        return x

    fn.rows_per_sample = rows
    with pytest.raises(ValueError, match=rf"rows_per_sample must be a positive integer .*got {re.escape(repr(rows))}"):
        solvers.DiffusionModel(fn, schedule=SCHEDULE)
    assert solvers.DiffusionModel(fn, schedule=SCHEDULE, rows_per_sample=np.int64(3)).rows_per_sample == 3


# -- what the model returns --------------------------------------------------------------------------


@pytest.mark.parametrize("returns, name", [(lambda x: x.numpy(), "a numpy.ndarray"), (lambda x: None, "None"),
                                           (lambda x: x.tolist(), "a list"), (lambda x: 0.0, "a float")])
def test_a_model_that_does_not_return_a_tensor_is_named(returns, name):
    """numpy/None/list/float from the network: TypeError saying what it must return and what it returned
    (before: AttributeError: 'numpy.ndarray' object has no attribute 'to')."""
    model = solvers.DiffusionModel(lambda x, t: returns(x), schedule=SCHEDULE)
    with pytest.raises(TypeError, match=rf"the model must return a torch.Tensor of the input's shape \(3, 4\); "
                                        rf"it returned {name}$"):
        solvers.sample(model, x_T(), "euler", 3)


def test_a_model_returning_another_shape_or_complex_values_raises():
    """A wrong shape is a ValueError with both shapes; a complex output (whose imaginary part a cast would
    drop) a TypeError."""
    wrong = solvers.DiffusionModel(lambda x, t: x[:, :2], schedule=SCHEDULE)
    with pytest.raises(ValueError, match=r"returned shape \(3, 2\) for input \(3, 4\)"):
        solvers.sample(wrong, x_T(), "euler", 3)
    complex_out = solvers.DiffusionModel(lambda x, t: x.to(torch.complex128), schedule=SCHEDULE)
    with pytest.raises(TypeError, match=r"returned a complex tensor \(torch.complex128\)"):
        solvers.sample(complex_out, x_T(), "euler", 3)


# -- non-finite model output under the adaptive solver -----------------------------------------------


def poisoned_once(call: int, row: int):
    """The mixture's network, with NaN in batch row ``row`` of its ``call``-th call only (1-based)."""
    net = CountingNet()

    def fn(x, t):
        out = net(x, t)
        if net.calls == call:
            out = out.clone()
            out[min(row, x.shape[0] - 1)] = math.nan
        return out

    return net, solvers.DiffusionModel(fn, schedule=SCHEDULE, prediction="eps")


@pytest.mark.parametrize("call", [2, 5, 20])
def test_adaptive_reports_a_single_nan_model_output(call):
    """One NaN network output (on the starting step's second call, or mid-way) used to be absorbed — the step
    was rejected and retried smaller (more NFE, a finite result) — or, on the starting step, ended in a
    max_steps RuntimeError.  Now the sample ends as NaN and sampling raises NonFiniteError for it."""
    _, model = poisoned_once(call, row=0)
    with pytest.raises(solvers.NonFiniteError, match=r"produced NaN/Inf in 1 of 3 samples: rows \[0\]") as err:
        solvers.sample(model, x_T(), "adaptive", seeds=[7, 8, 9], dtype=torch.float64)
    assert (err.value.samples, err.value.seeds) == ([0], [7])


def test_adaptive_flags_a_nan_model_output_and_leaves_the_other_samples_alone():
    """With on_nonfinite='flag' the poisoned sample is flagged and NaN; the others equal a clean run."""
    _, model = poisoned_once(5, row=1)
    res = solvers.sample(model, x_T(), "adaptive", dtype=torch.float64, on_nonfinite="flag")
    assert res.nonfinite.tolist() == [False, True, False]
    assert bool(torch.isnan(res.samples[1]).all())
    clean = solvers.sample(solvers.DiffusionModel(CountingNet(), schedule=SCHEDULE), x_T(), "adaptive",
                           dtype=torch.float64)
    # each sample takes its own steps, so a clean sample does not depend on its batch-mates
    assert torch.allclose(res.samples[[0, 2]], clean.samples[[0, 2]], rtol=1e-12, atol=1e-12)
    assert [res.nfe_per_sample[i] for i in (0, 2)] == [clean.nfe_per_sample[i] for i in (0, 2)]


# -- initial_noise's start time and invert's callback ----------------------------------------------


@pytest.mark.parametrize("schedule", [SCHEDULE, schedules.EDM()], ids=["vp", "edm"])
@pytest.mark.parametrize("t", [math.nan, math.inf, -0.5, 1e-7, 100.5, "1.0", True])
def test_initial_noise_refuses_a_start_time_outside_the_schedule(schedule, t):
    """initial_noise(schedule=…, t=NaN) used to return all-NaN noise, and a t outside the schedule noise of a
    level no sampler could start from (σ = 100.5 on EDM, σ > 1 on VP); each now raises, naming t and the range."""
    lo, hi = f"{schedule.t_min:g}", f"{schedule.t_max:g}"
    with pytest.raises(ValueError, match=rf"initial_noise on {type(schedule).__name__}: t must be in \[{lo}, {hi}\] "
                                         rf"and finite, got {re.escape(repr(t))}"):
        solvers.initial_noise((2, 3), schedule=schedule, t=t)


def test_initial_noise_accepts_every_time_a_grid_may_start_at():
    """The range ends themselves, a NumPy float and a one-element tensor are start times too."""
    edm = schedules.EDM()
    z = solvers.initial_noise((2, 3), dtype=torch.float64)
    for t in (edm.t_min, edm.t_max, np.float64(3.0), torch.tensor(3.0, dtype=torch.float64)):
        assert torch.equal(solvers.initial_noise((2, 3), schedule=edm, t=t, dtype=torch.float64), z * float(t))
    grid = solvers.make_grid(edm, 5)
    assert torch.equal(solvers.initial_noise((2, 3), schedule=edm, t=grid[0], dtype=torch.float64), z * grid[0])


def test_initial_noise_refuses_a_start_time_without_a_schedule():
    """t without a schedule used to be ignored (unit noise, whatever t); now it says that t needs the schedule."""
    with pytest.raises(ValueError, match=r"initial_noise: t=80\.0 is given without a schedule, so it would be "
                                         r"ignored; pass schedule="):
        solvers.initial_noise((2, 3), t=80.0)
