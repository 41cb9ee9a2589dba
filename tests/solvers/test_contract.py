"""The contract every registered solver keeps, and the errors bad input gets.

The solver-parametrised tests take their solvers from the registry (the ``solver_name`` fixture), so a newly
registered solver is held to the same contract without a test edit: declared NFE = measured NFE, batch
invariance to the bit, a result that records what was done, an explicit grid followed point by point, and
non-finite output reported by row.
"""
from __future__ import annotations

import math

import pytest
import torch

import solvers
from pretrained.analytic import gmm_nd
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULE = schedules.VPLinear()
# 15 values per sample, in a (3, 5) shape: the rows of a batch then straddle the vector-register boundaries
# of the CPU kernels differently at every batch size, which is what could break bit-identity.
MIXTURE = gmm_nd(dim=15, n_components=3, seed=1)
SAMPLE_SHAPE = (3, 5)

# Options that switch on the noise of solvers that are deterministic by default, so that their noise path
# is held to the batch-invariance contract too (solvers missing from the registry are skipped).
STOCHASTIC_OPTIONS = {"ddim": {"eta": 0.7}, "heun": {"s_churn": 20.0}, "dpmpp_2m_sde": {"eta": 1.0}}


def make_model(make_row_by_row) -> solvers.DiffusionModel:
    """The exact 15-D mixture as an ε-model on VPLinear, evaluated row by row (batch-invariant by construction)."""
    return solvers.DiffusionModel(make_row_by_row(MIXTURE.network(SCHEDULE, "eps")), schedule=SCHEDULE,
                                  prediction="eps")


def run(model, name, seeds, steps=6, **kwargs):
    """Sample from the per-seed initial noise with the per-seed solver noise, in float64."""
    x_T = solvers.initial_noise((len(seeds), *SAMPLE_SHAPE), seeds=seeds, schedule=SCHEDULE, dtype=torch.float64)
    return solvers.sample(model, x_T, name, steps, seeds=seeds, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("denoise_to_zero", [True, False], ids=["to_zero", "to_t_end"])
@pytest.mark.parametrize("steps", [1, 2, 5, 17])
def test_measured_nfe_equals_declared_nfe(solver_name, steps, denoise_to_zero, make_row_by_row, make_recorder):
    """res.nfe equals solver.nfe(grid, t_zero) and the network calls counted outside; rows are counted too."""
    rec = make_recorder(MIXTURE.network(SCHEDULE, "eps"))
    model = solvers.DiffusionModel(rec, schedule=SCHEDULE, prediction="eps")
    res = run(model, solver_name, list(range(4)), steps=steps, denoise_to_zero=denoise_to_zero)
    declared = solvers.get_solver(solver_name).nfe(res.timesteps, SCHEDULE.t_zero)
    assert res.nfe == len(rec.calls), "the loop must count every network call once"
    assert res.model_rows == sum(rows for rows, _ in rec.calls)
    if declared is None:
        assert getattr(solvers.solver_class(solver_name), "adaptive", False), \
            "only solvers that choose their steps at run time may leave nfe() undeclared"
        assert res.nfe >= 1
    else:
        assert res.nfe == declared
        assert res.model_rows == 4 * declared


def test_batch_invariance(solver_name, make_row_by_row):
    """Sample i is bit-identical at batch size 1, 7 and 64 and at any position in the batch."""
    model = make_model(make_row_by_row)
    configs = [{}] + ([STOCHASTIC_OPTIONS[solver_name]] if solver_name in STOCHASTIC_OPTIONS else [])
    seeds = list(range(1000, 1064))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    for options in configs:
        full = run(model, solver_name, seeds, **options).samples
        for batch in (1, 7):
            assert torch.equal(run(model, solver_name, seeds[:batch], **options).samples, full[:batch]), \
                f"{solver_name} {options}: batch {batch} differs from the same seeds in a batch of 64"
        shuffled = run(model, solver_name, [seeds[i] for i in perm], **options).samples
        assert torch.equal(shuffled, full[perm]), f"{solver_name} {options}: a sample changed with its position"
    assert bool(torch.isfinite(full).all())


def test_result_records_what_was_done(solver_name, make_row_by_row):
    """The result holds the grid, one order per step, the solver, its options, the seeds and the timings."""
    model = make_model(make_row_by_row)
    seeds = [5, 3, 11]
    res = run(model, solver_name, seeds, steps=7, spacing="karras")
    slv = solvers.get_solver(solver_name)
    assert res.timesteps == solvers.make_grid(SCHEDULE, 7, spacing="karras")
    assert len(res.orders) == 7 and all(isinstance(o, int) and o >= 1 for o in res.orders)
    assert res.solver == solver_name and res.options == slv.options()
    assert (res.spacing, res.denoise_to_zero, res.seeds) == ("karras", True, seeds)
    assert res.samples.shape == (3, *SAMPLE_SHAPE) and res.samples.dtype == torch.float64
    assert 0.0 <= res.time_model <= res.time_total
    assert res.time_solver == pytest.approx(res.time_total - res.time_model)


@pytest.mark.parametrize("grid", [[0.9, 0.6, 0.35, 0.2, 0.05], [0.7, 0.3, 0.1, 0.0]], ids=["to_t_end", "to_zero"])
def test_explicit_timesteps_are_followed_point_by_point(solver_name, grid, make_recorder):
    """With timesteps=…, the steps go exactly from each given point to the next: no added or moved point."""
    recorder = make_recorder(MIXTURE.network(SCHEDULE, "eps"))
    model = solvers.DiffusionModel(recorder, schedule=SCHEDULE, prediction="eps")
    steps_seen = []
    res = run(model, solver_name, [0, 1], steps=None, timesteps=torch.tensor(grid, dtype=torch.float64),
              callback=lambda info: steps_seen.append((info.step, info.t, info.t_next)))
    assert res.timesteps == grid
    assert steps_seen == [(i, grid[i], grid[i + 1]) for i in range(len(grid) - 1)]
    assert len(res.orders) == len(grid) - 1
    assert (res.spacing, res.denoise_to_zero) == (None, None)
    times = [t for _, ts in recorder.calls for t in ts]
    # The model is first called at the first point (to rounding: an adaptive solver maps t through λ and
    # back), and never outside [last, first] of the grid.
    assert recorder.calls[0][1] == [pytest.approx(float(SCHEDULE.model_time(grid[0])), rel=1e-12)]
    assert all(grid[-1] - 1e-12 <= t <= grid[0] + 1e-12 for t in times), times


def test_explicit_timesteps_must_agree_with_steps(make_row_by_row):
    """Giving both timesteps and a different steps count is an error, not a silent choice of one."""
    model = make_model(make_row_by_row)
    with pytest.raises(ValueError, match="steps=3 disagrees with the 2 steps of the given timesteps"):
        run(model, "euler", [0], steps=3, timesteps=[0.9, 0.5, 0.0])


@pytest.mark.parametrize("on_nonfinite", ["raise", "flag"])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_nonfinite_model_output_names_the_rows(solver_name, on_nonfinite, bad_value):
    """NaN/Inf from the network raises NonFiniteError naming the rows and seeds, or (flag) returns their mask."""
    bad_rows = [2, 5]
    inner = MIXTURE.network(SCHEDULE, "eps")

    def poisoned(x, t):
        out = inner(x, t)
        # Poison the rows on whole-batch calls only: an adaptive solver may call a subset of the rows, and
        # the poisoned rows' state is already non-finite after the first call (the network propagates it).
        if x.shape[0] == 7:
            out[bad_rows] = bad_value
        return out

    model = solvers.DiffusionModel(poisoned, schedule=SCHEDULE, prediction="eps")
    seeds = [10, 11, 12, 13, 14, 15, 16]
    if on_nonfinite == "raise":
        with pytest.raises(solvers.NonFiniteError, match=r"rows \[2, 5\] \(seeds \[12, 15\]\)") as err:
            run(model, solver_name, seeds)
        assert (err.value.samples, err.value.seeds) == (bad_rows, [12, 15])
        assert isinstance(err.value, FloatingPointError)
    else:
        res = run(model, solver_name, seeds, on_nonfinite="flag")
        assert res.nonfinite.tolist() == [i in bad_rows for i in range(7)]
        good = [i for i in range(7) if i not in bad_rows]
        assert bool(torch.isfinite(res.samples[good]).all()), "non-finite values leaked into other rows"


def test_clean_output_with_flag_gives_an_all_false_mask(make_row_by_row):
    """on_nonfinite='flag' always returns a mask, all False when every sample is finite."""
    res = run(make_model(make_row_by_row), "dpmpp_2m", [0, 1, 2], on_nonfinite="flag")
    assert res.nonfinite.tolist() == [False, False, False]


# -- bad input ---------------------------------------------------------------------------------------


def test_unknown_solver_lists_the_valid_names(make_row_by_row):
    """An unknown solver name raises ValueError listing every valid name (aliases included)."""
    with pytest.raises(ValueError, match="unknown solver 'dpm_fast'") as err:
        run(make_model(make_row_by_row), "dpm_fast", [0])
    for name in solvers.available_solvers():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.get_solver("EULER")


def test_aliases_reach_their_solver(make_row_by_row):
    """Each alias builds the solver it names, with the same result."""
    model = make_model(make_row_by_row)
    for alias, canonical in solvers.ALIASES.items():
        assert solvers.solver_class(alias) is solvers.solver_class(canonical)
        assert torch.equal(run(model, alias, [0, 1]).samples, run(model, canonical, [0, 1]).samples)


def test_unknown_solver_option_is_a_type_error_listing_the_options(solver_name):
    """An option the solver does not have raises TypeError naming it and listing the solver's options."""
    import dataclasses

    options = [f.name for f in dataclasses.fields(solvers.solver_class(solver_name))]
    with pytest.raises(TypeError, match=f"solver '{solver_name}' has no option\\(s\\) not_an_option") as err:
        solvers.get_solver(solver_name, not_an_option=1)
    for option in options:
        assert option in str(err.value)


def test_misspelt_option_reaches_the_user_through_sample(make_row_by_row):
    """sample() passes solver options through, so a misspelt one fails instead of being ignored."""
    with pytest.raises(TypeError, match="has no option\\(s\\) etta; its options are: eta"):
        run(make_model(make_row_by_row), "ddim", [0], etta=0.5)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_bad_steps_raise(steps, make_row_by_row):
    """steps must be a positive int: 0, negatives, floats, bools and strings raise ValueError."""
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run(make_model(make_row_by_row), "euler", [0], steps=steps)


@pytest.mark.parametrize("grid, message", [
    ([0.5, 0.7, 0.1], r"strictly decreasing .*point 1 \(0.7\) is not below point 0 \(0.5\)"),
    ([0.5, 0.5, 0.1], "strictly decreasing"),
    ([0.5], "at least 2 points"),
    ([0.5, math.nan, 0.0], "must be finite"),
    ([1.5, 0.5, 0.0], r"timesteps\[0\] = 1.5 is outside the range \[1e-05, 1.0\]"),
    ([0.5, 1e-7, 0.0], r"timesteps\[1\] = 1e-07 is outside the range"),
    ([0.5, -0.1], "below t_zero = 0.0"),
    ("0.5, 0.1", "1-D sequence of numbers"),
])
def test_bad_grids_raise_with_the_offending_point(grid, message, make_row_by_row):
    """Explicit grids must be finite, strictly decreasing and inside the schedule; the error names the point."""
    with pytest.raises(ValueError, match=message):
        run(make_model(make_row_by_row), "euler", [0], steps=None, timesteps=grid)


def test_grid_outside_other_schedules_ranges_raises(ring_mixture):
    """Each schedule checks its own range: EDM's σ_max, DiscreteVP's last index."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    edm = ring_mixture.as_model(schedules.EDM(), "eps")
    with pytest.raises(ValueError, match=r"outside the range \[0.002, 80.0\]"):
        solvers.sample(edm, x, "euler", timesteps=[100.0, 1.0, 0.0])
    ddpm = ring_mixture.as_model(schedules.DiscreteVP.linear(), "eps")
    with pytest.raises(ValueError, match=r"outside the range \[0.0, 999.0\]"):
        solvers.sample(ddpm, x, "euler", timesteps=[1000.0, 500.0, -1.0])


def test_unknown_spacing_and_bad_ranges_raise(make_row_by_row):
    """Unknown spacings list the valid ones; t_end above t_start, or a discrete spacing on VPLinear, raise."""
    model = make_model(make_row_by_row)
    with pytest.raises(ValueError, match="unknown spacing 'log'; valid: uniform, logsnr, karras"):
        run(model, "euler", [0], spacing="log")
    with pytest.raises(ValueError, match="t_end=0.8 must be below t_start=0.5"):
        run(model, "euler", [0], t_start=0.5, t_end=0.8)
    with pytest.raises(ValueError, match="defined on a DiscreteVP schedule only"):
        run(model, "euler", [0], spacing="leading")


def test_seeds_must_match_the_batch(make_row_by_row):
    """Seeds of the wrong length, a single int, or negative seeds raise ValueError saying what is expected."""
    model = make_model(make_row_by_row)
    x_T = torch.zeros(3, *SAMPLE_SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="seeds has 2 entries for a batch of 3"):
        solvers.sample(model, x_T, "ddpm", 4, seeds=[1, 2])
    with pytest.raises(ValueError, match="one entry per sample"):
        solvers.sample(model, x_T, "ddpm", 4, seeds=7)
    with pytest.raises(ValueError, match="non-negative integers"):
        solvers.sample(model, x_T, "ddpm", 4, seeds=[1, -2, 3])
    with pytest.raises(ValueError, match="seeds has 4 entries for a batch of 3"):
        solvers.initial_noise((3, 2), seeds=[0, 1, 2, 3])


def test_bad_call_arguments_raise(make_row_by_row):
    """A model that is not a DiffusionModel, an x_T without a batch, or a bad on_nonfinite value raise."""
    model = make_model(make_row_by_row)
    with pytest.raises(TypeError, match="model must be a solvers.DiffusionModel"):
        solvers.sample(lambda x, t: x, torch.zeros(1, 2), "euler", 2)
    with pytest.raises(ValueError, match="batch dimension"):
        solvers.sample(model, torch.zeros(0, 2), "euler", 2)
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'flag'"):
        solvers.sample(model, torch.zeros(1, *SAMPLE_SHAPE), "euler", 2, on_nonfinite="ignore")


def _option_fields(solver_name: str, types: tuple) -> list[str]:
    """The solver's options whose declared type is one of ``types`` (annotations are strings here)."""
    import dataclasses

    return [f.name for f in dataclasses.fields(solvers.solver_class(solver_name)) if f.type in types]


# Options that may be infinite: heun's s_tmax (its default, +inf, churns at every level).
INFINITE_ALLOWED = {("heun", "s_tmax")}


def test_real_valued_options_must_be_finite_numbers(solver_name, make_row_by_row):
    """Every float option of every registered solver refuses NaN, ±inf (unless listed above), bools and
    strings with a ValueError naming the option and the value, when the solver is built — before the grid or
    any model call (dpmpp_2m_sde's eta=nan used to end in a NonFiniteError, eta=inf and heun's s_churn=inf,
    s_noise=inf or consistency's sigma_boundary=nan/inf were accepted)."""
    calls = []
    inner = make_row_by_row(MIXTURE.network(SCHEDULE, "eps"))
    model = solvers.DiffusionModel(lambda x, t: calls.append(1) or inner(x, t), schedule=SCHEDULE)
    for option in _option_fields(solver_name, ("float", "Optional[float]")):
        bad_values = [math.nan, -math.inf, True, "0.5"]
        if (solver_name, option) not in INFINITE_ALLOWED:
            bad_values.append(math.inf)
        for bad in bad_values:
            with pytest.raises(ValueError, match=f"{option}.*{bad!r}") as err:
                solvers.get_solver(solver_name, **{option: bad})
            assert solver_name in str(err.value)
            with pytest.raises(ValueError, match=option):
                run(model, solver_name, [0], **{option: bad})
    assert calls == []


def test_integer_options_must_be_integers(solver_name):
    """Every int option refuses bools, floats and numbers below 1 with a ValueError naming the option."""
    for option in _option_fields(solver_name, ("int",)):
        for bad in (True, 2.5, 0, -1):
            with pytest.raises(ValueError, match=f"{option} must be a positive integer|{option} must be an integer"):
                solvers.get_solver(solver_name, **{option: bad})


def test_infinite_s_tmax_stays_heuns_default():
    """heun's s_tmax=inf (its default) is accepted; NaN is not."""
    assert solvers.get_solver("heun", s_churn=10.0, s_tmax=math.inf).s_tmax == math.inf
    with pytest.raises(ValueError, match=r"heun: s_tmax must be in \[0, inf\], got nan"):
        solvers.get_solver("heun", s_tmax=math.nan)
