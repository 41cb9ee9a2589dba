"""A fixed-grid solver driven one network evaluation at a time, as a diffusers pipeline drives a scheduler.

A pipeline calls the network at each entry of ``scheduler.timesteps`` and hands the output to
``scheduler.step``; our solvers drive their own loop (a step calls the model one or more times).  The control
is inverted by *replay*: the evaluation times of a fixed-grid solver are known in advance from a dry run of
the solver on zeros (so every registered solver is covered without a list); ``step`` re-runs the solver's own
``step`` against a model that returns the outputs the pipeline has given so far in this solver step.  When the
solver asks for one more evaluation (Heun's end point, DPM-Solver++(2S)'s midpoint, Langevin's inner steps)
the attempt stops there, and the state the model is wanted at goes back to the pipeline; the next call re-runs
the solver step with one more output (and the same noise).  The arithmetic is that of :func:`solvers.sample`
on the same grid, operation for operation.

This module needs no diffusers; :mod:`solvers.interop.scheduler` wraps it in diffusers' scheduler API.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..base import StepContext, points_at, resolve_lower_order_final

__all__ = ["Replay", "PipelineNoise", "EvaluationPlan", "Run"]


class NeedEvaluation(Exception):
    """Raised by the replayed model when the solver asks for an output the pipeline has not given yet."""

    def __init__(self, x: torch.Tensor):
        super().__init__("the solver needs another network evaluation")
        self.x = x


class Replay:
    """The network as the solver sees it inside ``step``: the pipeline's outputs of this solver step, in order.

    In dry-run mode (``probe=True``) it returns zeros and records the inputs it is called with.
    """

    def __init__(self):
        self.outputs: list = []
        self.calls = 0
        self.probe = False
        self.inputs: list = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.probe:
            self.inputs.append(x)
            return torch.zeros_like(x)
        k, self.calls = self.calls, self.calls + 1
        if k < len(self.outputs):
            # A re-run may not see a tensor a previous attempt has modified: replayed outputs are copies.
            return self.outputs[k] if k == len(self.outputs) - 1 else self.outputs[k].clone()
        raise NeedEvaluation(x)


class PipelineNoise:
    """Per-step standard normal noise from the pipeline's ``generator``, replayed when a step is re-run.

    A list of generators draws row i from generator i (diffusers' ``randn_tensor`` convention, and the
    draws of :class:`solvers.noise.SeedStreams` for the same generators); one generator draws the batch;
    ``None`` uses torch's global generator.
    """

    def __init__(self):
        self.generator = None
        self.batch = 1
        self.drawn: list = []
        self.used = 0
        self.zero = False

    def randn(self, sample_shape, *, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        if self.used < len(self.drawn):
            self.used += 1
            return self.drawn[self.used - 1]
        shape = tuple(sample_shape)
        draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        g = self.generator
        if self.zero:
            z = torch.zeros((1, *shape), dtype=dtype, device=device)
        elif isinstance(g, (list, tuple)):
            z = torch.stack([torch.randn(shape, generator=gi, dtype=draw_dtype, device=gi.device) for gi in g])
        else:
            z = torch.randn((self.batch, *shape), generator=g, dtype=draw_dtype,
                            device=device if g is None else g.device)
        z = z.to(device=device, dtype=dtype)
        self.drawn.append(z)
        self.used += 1
        return z


class _RecordingContext(StepContext):
    """A step context that records the solver time of every model evaluation (``times``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.times: list = []

    def denoise(self, x, p):
        self.times.append(p.t)
        return super().denoise(x, p)

    def denoise_combine(self, x, p, c_x, c_d):
        self.times.append(p.t)
        return super().denoise_combine(x, p, c_x, c_d)


def _dry_run(solver, model, points, replay: Replay, noise: PipelineNoise) -> tuple[list, list, list]:
    """From a run on zeros: the solver time of every evaluation, the evaluations of each step, and whether a
    step changes its state before its first evaluation (Heun's churn)."""
    replay.probe, noise.zero = True, True
    ctx = _RecordingContext(model, points, noise)
    state, x, per_step, moves = solver.init_state(ctx), torch.zeros(1, 1, dtype=torch.float64), [], []
    try:
        for i in range(ctx.steps):
            before, replay.inputs = len(ctx.times), []
            noise.drawn, noise.used = [], 0
            x_in = x
            x, state, _ = solver.step(ctx, i, x, state)
            per_step.append(len(ctx.times) - before)
            moves.append(bool(replay.inputs) and replay.inputs[0] is not x_in)
    finally:
        replay.probe, noise.zero, noise.drawn, noise.used, replay.inputs = False, False, [], 0, []
    return list(ctx.times), per_step, moves


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """Where a solver evaluates the network on a grid: the solver time of every evaluation (``times``), the
    evaluations of each step, and the index in ``times`` of each step's first evaluation (``step_starts``)."""

    grid: list
    times: list
    evals_per_step: list
    moves_first: list

    @property
    def step_starts(self) -> list:
        starts, k = [], 0
        for n in self.evals_per_step:
            starts.append(k)
            k += n
        return starts

    @classmethod
    def of(cls, solver, model, grid: list, replay: Replay) -> "EvaluationPlan":
        points = points_at(model.schedule, model, grid)
        solver.check(points)
        times, per_step, moves = _dry_run(solver, model, points, replay, PipelineNoise())
        return cls(list(grid), times, per_step, moves)


def _solver_from(solver, steps: int):
    """The solver with ``lower_order_final="auto"`` decided on the whole grid's ``steps`` (a run that begins
    mid-grid decides it as the whole run would, as diffusers' schedulers do)."""
    if getattr(solver, "lower_order_final", None) == "auto":
        return dataclasses.replace(solver, lower_order_final=resolve_lower_order_final("auto", steps))
    return solver


class Run:
    """One sampling run from step ``first`` of a plan's grid to its end: the solver, its context and state.

    ``k`` counts the evaluations handed in so far, from the plan's evaluation ``plan.step_starts[first]``;
    ``network_times`` holds the network time of each of the plan's evaluations.
    """

    def __init__(self, solver, model, replay: Replay, plan: EvaluationPlan, first: int, network_times: list):
        steps = len(plan.grid) - 1
        self.network_times = list(network_times)
        self.solver, self.model, self.replay, self.plan = _solver_from(solver, steps), model, replay, plan
        self.noise = PipelineNoise()
        self.first, self.k0 = first, plan.step_starts[first]
        self.points = points_at(model.schedule, model, plan.grid[first:])
        if plan.moves_first[first]:
            raise ValueError(f"{solver.name} {solver.options()} changes the state before the first evaluation of "
                             f"the step it starts with (e.g. Heun's churn), but a pipeline evaluates its starting "
                             f"state itself; keep that level out of the churn range (s_tmax below σ/α = "
                             f"{self.points[0].sigma_ve:.4g}) or call solvers.sample")
        self.ctx = StepContext(model, self.points, self.noise)
        self.state = self.solver.init_state(self.ctx)
        self.i, self.k, self.x_start = 0, 0, None

    @property
    def position(self) -> int:
        """The index in ``plan.times`` of the evaluation the run waits for."""
        return self.k0 + self.k

    def _attempt(self):
        """Run solver step i on the outputs given so far (replaying its noise): (x_next, state) or the state
        at which it needs the next evaluation (a ``NeedEvaluation``)."""
        self.replay.calls, self.noise.used = 0, 0
        try:
            with torch.no_grad():
                return self.solver.step(self.ctx, self.i, self.x_start, self.state)[:2]
        except NeedEvaluation as need:
            return need

    def advance(self, model_output: torch.Tensor, sample: torch.Tensor, generator) -> torch.Tensor:
        """Take the pipeline's output at evaluation ``position``; return the next step's state, or the state
        at which the solver wants its next evaluation."""
        if self.x_start is None:
            self.x_start = sample
        self.replay.outputs.append(model_output)
        self.k += 1
        self.noise.generator, self.noise.batch = generator, self.x_start.shape[0]
        result = self._attempt()
        if isinstance(result, NeedEvaluation):
            return result.x
        x_next, self.state = result
        self.i, self.replay.outputs, self.noise.drawn, self.x_start = self.i + 1, [], [], None
        if self.first + self.i < len(self.plan.moves_first) and self.plan.moves_first[self.first + self.i]:
            # The next step changes the state before its first evaluation: hand the pipeline that state.
            self.x_start = x_next
            result = self._attempt()
            if isinstance(result, NeedEvaluation):
                return result.x
            raise RuntimeError(f"{self.solver.name}: step {self.i} needed no evaluation")  # pragma: no cover
        return x_next

    def x0(self, model_output: torch.Tensor, sample: torch.Tensor, t: float) -> torch.Tensor:
        """The model's x0 (clipped or thresholded as configured) for an output at ``sample`` and solver time t."""
        a, b = self.model.conversion(t)
        return self.model.threshold(model_output.to(sample.dtype) * b + sample * a)
