"""The one sampling loop: grid, coefficients, counted model calls, noise streams, timing, callbacks."""
from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .base import StepContext, points_at
from .grids import check_steps, make_grid, validate_grid
from .model import DiffusionModel
from .noise import STREAM_SOLVER, as_seeds, check_rng, make_streams
from .registry import get_solver
from .validation import as_float_dtype, check_float_tensor

__all__ = ["sample", "SampleResult", "StepInfo", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or Inf; ``.samples`` lists the batch rows affected and ``.seeds`` their seeds."""

    def __init__(self, message: str, samples: list[int], seeds: list[int]):
        super().__init__(message)
        self.samples = samples
        self.seeds = seeds


@dataclass
class StepInfo:
    """Passed to the per-step callback after each step."""

    step: int
    t: float
    t_next: float
    x: torch.Tensor       # the state after the step
    order: int            # the order the solver used on this step
    nfe: int              # model calls so far


@dataclass
class SampleResult:
    """The outcome of :func:`sample`.

    Attributes:
        samples: the final state, same shape as ``x_T``.
        nfe: model calls (network evaluations; a classifier-free-guidance call counts once).
        model_rows: network batch rows evaluated (batch × calls × rows per sample, e.g. ×2 under CFG).
        timesteps: the grid actually used (solver time).
        orders: the order used on each step.
        solver, options: the solver's name and options; ``spacing`` and ``denoise_to_zero`` as given.
        time_total, time_model, time_solver: wall-clock seconds (device synchronised at the end; on CUDA
            the model time comes from CUDA events).  time_solver = total − model.
        nonfinite: bool tensor (batch,) — rows with NaN/Inf (only when ``on_nonfinite="flag"``).
        nfe_per_sample: the model calls each sample took part in (list of ints).  Equal to ``nfe`` for every
            fixed-grid solver; for ``adaptive``, whose samples take their own steps, each sample's own count
            (``nfe`` then counts batched calls, a call with any number of rows counting once).
    """

    samples: torch.Tensor
    nfe: int
    model_rows: int
    timesteps: list
    orders: list
    solver: str
    options: dict
    spacing: Optional[str]
    denoise_to_zero: Optional[bool]
    time_total: float
    time_model: float
    time_solver: float
    nonfinite: Optional[torch.Tensor] = None
    seeds: list = field(default_factory=list)
    nfe_per_sample: Optional[list] = None


class _CpuTimer:
    def __init__(self):
        self.total = 0.0
        self._t0 = 0.0

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        self.total += time.perf_counter() - self._t0

    def seconds(self) -> float:
        return self.total


_EVENT_POOL: dict = {}          # device → CUDA timing events for reuse (creating one costs a driver call)
_EVENT_POOL_MAX = 4096


class _CudaTimer:
    """Model time from CUDA events: recorded asynchronously, read once after the final synchronise; the events
    then go back to a pool for the next call."""

    def __init__(self, device: torch.device):
        self.events = []
        self.stream = torch.cuda.current_stream(device)   # the state's device, whichever device is current
        self.pool = _EVENT_POOL.setdefault(str(device), [])

    def _event(self):
        ev = self.pool.pop() if self.pool else torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        self.events.append(ev)

    def start(self):
        self._event()

    def stop(self):
        self._event()

    def seconds(self) -> float:
        ev = self.events
        total = sum(ev[k].elapsed_time(ev[k + 1]) for k in range(0, len(ev) - 1, 2)) / 1000.0
        room = _EVENT_POOL_MAX - len(self.pool)
        if room > 0:
            self.pool.extend(ev[:room])
        self.events = []
        return total


DEFAULT_STEPS = 10

# Grids and their coefficients depend only on the schedule, the model's parameterisation and the grid's
# arguments, so they are computed once and reused: a benchmark or a dataset run samples many batches on one
# grid, and the setup (about 1 ms for 10 steps, 10 ms for 1000) would otherwise rival the steps of a small
# model.  Kept weakly per model, the few most recent grids each; an entry holds its schedule, so a model given
# a new schedule object never hits an old entry.
_PREPARED: "weakref.WeakKeyDictionary[DiffusionModel, OrderedDict]" = weakref.WeakKeyDictionary()
_PREPARED_PER_MODEL = 8


def _prepared(model: DiffusionModel, timesteps, steps, spacing, t_start, t_end, denoise_to_zero):
    """(grid, points, time tables) for these grid arguments: validated/built and evaluated once, then reused."""
    schedule = model.schedule
    try:
        given = None if timesteps is None else tuple(
            float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps))
        key = (model.prediction, given, steps, spacing, t_start, t_end, denoise_to_zero)
        hash(key)
    except (TypeError, ValueError):
        key = None  # not a plain grid: let validate_grid say what is wrong
    per_model = _PREPARED.get(model)
    entry = per_model.get(key) if per_model is not None and key is not None else None
    if entry is not None and entry[0] is schedule:
        per_model.move_to_end(key)
        return list(entry[1]), list(entry[2]), entry[3]
    if timesteps is not None:
        grid = validate_grid(schedule, timesteps)
    else:
        grid = make_grid(schedule, steps, spacing=spacing, t_start=t_start, t_end=t_end,
                         denoise_to_zero=denoise_to_zero)
    points = points_at(schedule, model, grid)
    tables: dict = {}  # the grid's network-time tables on a device (StepContext), kept with the grid
    if key is not None:
        per_model = _PREPARED.setdefault(model, OrderedDict())
        per_model[key] = (schedule, tuple(grid), tuple(points), tables)
        while len(per_model) > _PREPARED_PER_MODEL:
            per_model.popitem(last=False)
    return grid, points, tables


def check_call(model: DiffusionModel, x: torch.Tensor, what: str, dtype: Union[None, torch.dtype, str],
               steps: Optional[int]) -> Optional[torch.dtype]:
    """The argument checks :func:`sample` and :func:`solvers.invert` share, before any work.

    Returns the state dtype as a ``torch.dtype`` (``None`` if not given).

    Raises:
        TypeError: a model that is not a DiffusionModel; a state ``x`` (named ``what``) or dtype that is not
            real floating.
        ValueError: an empty state; ``steps`` that is not a positive integer up to the limit.
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a solvers.DiffusionModel, got {type(model).__name__}")
    check_float_tensor(x, what)
    if steps is not None:
        check_steps(steps)
    return None if dtype is None else as_float_dtype(dtype)


def sample(model: DiffusionModel, x_T: torch.Tensor, solver: str = "dpmpp_2m", steps: Optional[int] = None, *,
           timesteps: Optional[Sequence[float]] = None, spacing: str = "logsnr", t_start: Optional[float] = None,
           t_end: Optional[float] = None, denoise_to_zero: bool = True, seeds=None,
           dtype: Union[None, torch.dtype, str] = None, callback: Optional[Callable[[StepInfo], Any]] = None,
           progress: bool = False, on_nonfinite: str = "raise", timing: bool = True, rng: str = "torch",
           **solver_options) -> SampleResult:
    """Integrate from ``x_T`` at the grid's first time to its last with the named solver.

    Args:
        model: the :class:`~solvers.DiffusionModel`.
        x_T: the starting state at ``timesteps[0]`` (see :func:`solvers.initial_noise`): a real floating
            tensor (float16, bfloat16, float32 or float64), batch first; integer, bool and complex states
            raise TypeError.
        solver: a name from :func:`solvers.available_solvers`.
        steps: number of solver steps (default 10; at most :data:`solvers.grids.MAX_STEPS`).  With
            ``timesteps`` it may be left out; if given it must agree with the grid.
        timesteps: an explicit strictly decreasing grid of ``steps + 1`` solver times; the solver then
            integrates exactly from ``timesteps[0]`` to ``timesteps[-1]`` over those points, no extra step.
        spacing, t_start, t_end, denoise_to_zero: how to build the grid (:func:`solvers.grids.make_grid`).
        seeds: one non-negative int per sample for the solver's noise (``None`` → 0 … batch−1); sample i
            is the same whatever the batch size or composition.
        dtype: dtype of the solver state: a real floating ``torch.dtype`` or its name (``torch.float64`` or
            ``"float64"``); anything else raises TypeError.  The network is called in the model's
            ``input_dtype`` (default: a network module's own dtype, else the state's), its output cast back.
        callback: called with a :class:`StepInfo` after every step.
        progress: show a tqdm progress bar over the steps.
        on_nonfinite: ``"raise"`` (a :class:`NonFiniteError` naming the samples) or ``"flag"`` (set
            ``result.nonfinite``).
        timing: record model time per call (cheap; one synchronise at the end either way).
        rng: the stochastic solvers' noise generator: ``"torch"`` (per-sample CPU generators, the same bits on
            every device) or ``"philox"`` (counter-based, computed on the state's device: far cheaper on a
            GPU at large batches); see :mod:`solvers.noise`.
        **solver_options: options of the solver (e.g. ``eta=0.5`` for ddim); unknown options raise.

    Returns:
        :class:`SampleResult`.

    Raises:
        TypeError: a model that is not a DiffusionModel; an x_T or dtype that is not real floating; an unknown
            solver option; a callback that is not callable; a ``denoise_to_zero`` that is not a bool; a network
            that does not return a tensor.
        ValueError: a bad argument (steps, grid, seeds, solver option value …), each checked before the first
            model call.
        NonFiniteError: NaN/Inf in the result (with ``on_nonfinite="raise"``).
    """
    dtype = check_call(model, x_T, "x_T", dtype, steps)
    _check_outcome_options(on_nonfinite, rng, callback)
    slv = get_solver(solver, **solver_options)
    grid, points, tables, spacing_used, denoise_used = _grid_for_call(
        model, timesteps, steps, spacing, t_start, t_end, denoise_to_zero)
    slv.check(points)
    seed_list = as_seeds(seeds, x_T.shape[0])
    x = x_T if dtype is None else x_T.to(dtype)
    ctx, timer = _step_context(model, slv, x, points, tables, seed_list, rng, timing)
    x, orders, total, model_time = _integrate(slv, ctx, timer, x, grid, callback, progress)
    nonfinite = _nonfinite_rows(x, seed_list, on_nonfinite, slv.name)
    return SampleResult(samples=x, nfe=ctx.nfe, model_rows=ctx.model_rows, timesteps=grid, orders=orders,
                        solver=slv.name, options=slv.options(), spacing=spacing_used, denoise_to_zero=denoise_used,
                        time_total=total, time_model=model_time, time_solver=total - model_time,  # NaN untimed
                        nonfinite=nonfinite, seeds=seed_list, nfe_per_sample=ctx.nfe_per_sample())


def _check_outcome_options(on_nonfinite: str, rng: str, callback) -> None:
    """Check :func:`sample`'s ``on_nonfinite`` (``"raise"`` or ``"flag"``), ``rng`` and ``callback`` (None or
    callable) before any work."""
    if on_nonfinite not in ("raise", "flag"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'flag', got {on_nonfinite!r}")
    check_rng(rng)
    check_callback(callback)


def check_callback(callback) -> None:
    """Refuse a ``callback`` of :func:`sample` or :func:`solvers.invert` that is neither None nor callable,
    before any work (it would fail only after the first step's model calls).

    Raises:
        TypeError: naming what was given.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable as callback(info: StepInfo), got "
                        f"{type(callback).__name__} {callback!r}")


def _grid_for_call(model: DiffusionModel, timesteps, steps, spacing, t_start, t_end, denoise_to_zero):
    """The grid of a :func:`sample` call: (grid, points, time tables, spacing used, denoise_to_zero used).

    An explicit ``timesteps`` grid is used as given (``steps``, if also given, must agree with it; spacing and
    denoise_to_zero are then reported as ``None``); otherwise the grid is built from ``steps`` (default
    :data:`DEFAULT_STEPS`) and the spacing arguments.
    """
    if timesteps is not None:
        grid, points, tables = _prepared(model, timesteps, None, spacing, t_start, t_end, denoise_to_zero)
        if steps is not None and steps != len(grid) - 1:
            raise ValueError(f"steps={steps} disagrees with the {len(grid) - 1} steps of the given timesteps; "
                             "pass steps=None or the matching count")
        return grid, points, tables, None, None
    if steps is None:
        steps = DEFAULT_STEPS
    grid, points, tables = _prepared(model, None, steps, spacing, t_start, t_end, denoise_to_zero)
    return grid, points, tables, spacing, denoise_to_zero


def _step_context(model: DiffusionModel, slv, x: torch.Tensor, points, tables, seed_list: list, rng: str,
                  timing: bool):
    """The solver's view of one call and its model-call timer: (StepContext, timer).

    The context holds the model, the grid's points and the noise streams (stochastic solvers only); the timer
    uses CUDA events on a CUDA state and is ``None`` without ``timing``.
    """
    noise = make_streams(seed_list, STREAM_SOLVER, rng) if slv.is_stochastic else None
    timer = ((_CudaTimer(x.device) if x.is_cuda else _CpuTimer()) if timing else None)
    return StepContext(model, points, noise, timer, batch=x.shape[0], time_tables=tables), timer


def _integrate(slv, ctx: StepContext, timer, x: torch.Tensor, grid: list, callback, progress: bool):
    """Run the solver over every step of the grid, timed (the device synchronised before and after).

    Returns:
        (final state, order used on each step, total seconds, model seconds — NaN without a timer).
    """
    on_cuda = x.is_cuda
    if on_cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    state = slv.init_state(ctx)
    orders = []
    iterator = range(ctx.steps)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"{slv.name} ({ctx.steps} steps)", leave=False)
    with torch.no_grad():
        for i in iterator:
            x, state, order = slv.step(ctx, i, x, state)
            orders.append(order)
            if callback is not None:
                callback(StepInfo(step=i, t=grid[i], t_next=grid[i + 1], x=x, order=order, nfe=ctx.nfe))
    if on_cuda:
        torch.cuda.synchronize(x.device)
    total = time.perf_counter() - t0
    model_time = timer.seconds() if timer is not None else float("nan")
    return x, orders, total, model_time


def _nonfinite_rows(x: torch.Tensor, seed_list: list, on_nonfinite: str, solver_name: str
                    ) -> Optional[torch.Tensor]:
    """The rows of ``x`` holding NaN/Inf, as :attr:`SampleResult.nonfinite` wants them.

    Returns:
        a bool tensor (batch,) with ``on_nonfinite="flag"``; ``None`` with ``"raise"`` when all are finite.

    Raises:
        NonFiniteError: with ``on_nonfinite="raise"``, naming the affected rows and their seeds.
    """
    batch = x.shape[0]
    # A finite sum means every entry is finite (NaN and ±Inf propagate): one cheap reduction in the common
    # case; the per-row check only when something (or the sum itself) is not finite.
    if bool(torch.isfinite(x.sum())):
        return torch.zeros(batch, dtype=torch.bool, device=x.device) if on_nonfinite == "flag" else None
    bad = ~torch.isfinite(x.reshape(batch, -1)).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        if on_nonfinite == "raise":
            raise NonFiniteError(
                f"sampling with {solver_name} produced NaN/Inf in {len(rows)} of {batch} samples: rows "
                f"{rows[:20]}{' …' if len(rows) > 20 else ''} (seeds {[seed_list[r] for r in rows[:20]]}). "
                "Check the model output and the grid; pass on_nonfinite='flag' to get the samples anyway.",
                rows, [seed_list[r] for r in rows])
        return bad
    return bad if on_nonfinite == "flag" else None
