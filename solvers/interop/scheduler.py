"""``SolverScheduler``: any fixed-grid solver of this library as a drop-in diffusers scheduler.

    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m")

A diffusers pipeline drives the loop itself: it calls the network at each entry of ``scheduler.timesteps``
and hands the output to ``scheduler.step``.  Our solvers drive their own loop (a step calls the model one or
more times).  The scheduler inverts the control by *replay*: the evaluation times of a fixed-grid solver
are known in advance (found by a dry run of the solver, so every registered solver is covered without a
list), they become ``timesteps``; ``step`` runs the solver's own ``step`` against a model that returns the
outputs the pipeline has given so far in this solver step.  When the solver asks for one more evaluation
(Heun's end point, DPM-Solver++(2S)'s midpoint, Langevin's inner steps) the attempt stops there, and the
state the model is wanted at goes back to the pipeline as ``prev_sample``; the next ``step`` call re-runs
the solver step with one more output (and the same noise).  The arithmetic is that of :func:`solvers.sample`
on the same grid, operation for operation.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

from ..base import StepContext, points_at
from ..grids import make_grid, validate_grid
from ..registry import get_solver, solver_class
from .diffusers import config_dict, model_from_config

__all__ = ["SolverScheduler", "SolverSchedulerOutput", "diffusers_grid"]

GRID_OPTIONS = ("spacing", "t_start", "t_end", "denoise_to_zero")
# Step arguments of diffusers' schedulers that carry no instruction for our solvers at these values.
_NEUTRAL_STEP_KWARGS = {"variance_noise": None, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


class SolverSchedulerOutput:
    """What ``step`` returns: ``.prev_sample`` (also ``[0]``, as diffusers' ``SchedulerOutput``)."""

    def __init__(self, prev_sample: torch.Tensor):
        self.prev_sample = prev_sample

    def __getitem__(self, index):
        return (self.prev_sample,)[index]

    def to_tuple(self) -> tuple:
        return (self.prev_sample,)


class _Config(dict):
    """A read-only view of the configuration with attribute access, like diffusers' ``FrozenDict``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _NeedEvaluation(Exception):
    """Raised by the replayed model when the solver asks for an output the pipeline has not given yet."""

    def __init__(self, x: torch.Tensor):
        super().__init__("the solver needs another network evaluation")
        self.x = x


class _Replay:
    """The network as the solver sees it inside ``step``: the pipeline's outputs of this solver step, in order.

    In dry-run mode (``probe=True``) it returns zeros and records the network times it is asked for.
    """

    def __init__(self):
        self.outputs: list = []
        self.calls = 0
        self.probe = False
        self.times: list = []
        self.inputs: list = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.probe:
            self.times.append(float(t.reshape(-1)[0]))
            self.inputs.append(x)
            return torch.zeros_like(x)
        k, self.calls = self.calls, self.calls + 1
        if k < len(self.outputs):
            # A re-run may not see a tensor a previous attempt has modified: replayed outputs are copies.
            return self.outputs[k] if k == len(self.outputs) - 1 else self.outputs[k].clone()
        raise _NeedEvaluation(x)


class _PipelineNoise:
    """Per-step standard normal noise from the pipeline's ``generator``, replayed when a step is re-run.

    A list of generators draws row i from generator i (diffusers' ``randn_tensor`` convention, and the
    draws of :class:`solvers.noise.SeedStreams` for the same generators); one generator draws the batch;
    ``None`` uses torch's global generator.
    """

    def __init__(self):
        self.generator = None
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


def diffusers_grid(config: Any, schedule, steps: int) -> list[float]:
    """The solver grid of ``steps`` steps on a diffusers config's ``timestep_spacing`` and final step.

    The points are those of the diffusers scheduler the config describes: ``leading`` (+ ``steps_offset``),
    ``trailing`` and ``linspace`` as DDIM/DDPM/PNDM place them (σ-schedulers — configs with
    ``interpolation_type`` — keep linspace's fractional points); multistep configs (``solver_order``:
    DPM-Solver, UniPC, DEIS) place ``steps + 1`` leading/linspace points and drop the last, as they do.
    The final point is 0 (ᾱ_0) for ``final_sigmas_type="sigma_min"`` (or, in configs without that key,
    ``set_alpha_to_one=False``), else the schedule's ``t_zero`` (ᾱ = 1).
    """
    cfg = config_dict(config)
    spacing, offset = cfg.get("timestep_spacing", "leading"), int(cfg.get("steps_offset", 0) or 0)
    big_n = schedule.num_train_timesteps
    multistep = "solver_order" in cfg and spacing in ("leading", "linspace")
    n = steps + 1 if multistep else steps
    if spacing == "linspace" and "interpolation_type" in cfg:
        levels = torch.linspace(0, big_n - 1, n, dtype=torch.float64).flip(0).tolist()
    elif spacing in ("leading", "trailing", "linspace"):
        levels = make_grid(schedule, n, spacing=spacing, steps_offset=offset, denoise_to_zero=True)[:-1]
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of diffusers' leading, trailing, linspace")
    levels = levels[:steps]
    if "final_sigmas_type" in cfg:
        final = 0.0 if cfg["final_sigmas_type"] == "sigma_min" else float(schedule.t_zero)
    else:
        final = 0.0 if cfg.get("set_alpha_to_one") is False else float(schedule.t_zero)
    grid = levels + ([final] if final < levels[-1] else [])
    return validate_grid(schedule, grid)


class _Run:
    """One sampling run between ``set_timesteps`` and the last ``step``: the solver, its context and state."""

    def __init__(self, solver, model, replay: _Replay, grid: list):
        self.solver, self._model, self.replay, self.grid = solver, model, replay, grid
        self.noise = _PipelineNoise()
        self.points = points_at(model.schedule, model, grid)
        solver.check(self.points)
        self.model_times, self.evals_per_step, self.moves_first = self._dry_run()
        if self.moves_first[0]:
            raise ValueError(f"{solver.name} {solver.options()} changes the state before the first evaluation of "
                             f"its first step (e.g. Heun's churn), but a pipeline evaluates its initial noise itself; "
                             f"keep the first level out of the churn range (s_tmax below σ/α = "
                             f"{self.points[0].sigma_ve:.4g}) or call solvers.sample")
        self.ctx = StepContext(model, self.points, self.noise)
        self.state = solver.init_state(self.ctx)
        self.i, self.k, self.x_start = 0, 0, None

    def _dry_run(self) -> tuple[list, list, list]:
        """From a run on zeros: the network time of every evaluation, the evaluations of each step, and
        whether a step changes its state before its first evaluation (Heun's churn)."""
        self.replay.probe, self.replay.times, self.noise.zero = True, [], True
        ctx = StepContext(self._model, self.points, self.noise)
        state, x, per_step, moves = self.solver.init_state(ctx), torch.zeros(1, 1, dtype=torch.float64), [], []
        try:
            for i in range(ctx.steps):
                before, self.replay.inputs = len(self.replay.times), []
                self.noise.drawn, self.noise.used = [], 0
                x_in = x
                x, state, _ = self.solver.step(ctx, i, x, state)
                per_step.append(len(self.replay.times) - before)
                moves.append(bool(self.replay.inputs) and self.replay.inputs[0] is not x_in)
        finally:
            self.replay.probe, self.noise.zero, self.noise.drawn, self.noise.used = False, False, [], 0
            self.replay.inputs = []
        return list(self.replay.times), per_step, moves

    def _attempt(self):
        """Run solver step i on the outputs given so far (replaying its noise): (x_next, state) or the state
        at which it needs the next evaluation (an ``_NeedEvaluation``)."""
        self.replay.calls, self.noise.used = 0, 0
        try:
            with torch.no_grad():
                return self.solver.step(self.ctx, self.i, self.x_start, self.state)[:2]
        except _NeedEvaluation as need:
            return need

    def advance(self, model_output: torch.Tensor, sample: torch.Tensor, generator) -> torch.Tensor:
        """Take the pipeline's output of evaluation k; return the next step's state, or the state at which
        the solver wants its next evaluation."""
        if self.x_start is None:
            self.x_start = sample
        self.replay.outputs.append(model_output)
        self.k += 1
        self.noise.generator, self.noise.batch = generator, self.x_start.shape[0]
        result = self._attempt()
        if isinstance(result, _NeedEvaluation):
            return result.x
        x_next, self.state = result
        self.i, self.replay.outputs, self.noise.drawn, self.x_start = self.i + 1, [], [], None
        if self.i < len(self.moves_first) and self.moves_first[self.i]:
            # The next step changes the state before its first evaluation: hand the pipeline that state.
            self.x_start = x_next
            result = self._attempt()
            if isinstance(result, _NeedEvaluation):
                return result.x
            raise RuntimeError(f"{self.solver.name}: step {self.i} needed no evaluation")  # pragma: no cover
        return x_next


class SolverScheduler:
    """A diffusers-compatible scheduler that samples with one of this library's fixed-grid solvers.

    Build it from the pipeline's scheduler config (which says how the network was trained:
    :func:`~solvers.interop.model_from_config`) and a solver name with its options::

        pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m")

    ``set_timesteps(n)`` builds an n-step grid on the config's ``timestep_spacing``/``steps_offset`` and
    final-step settings (:func:`diffusers_grid`), or — given any of ``spacing``, ``t_start``, ``t_end``,
    ``denoise_to_zero`` among the options — with :func:`solvers.make_grid`.  ``timesteps`` then lists the
    network time of *every* evaluation (a two-evaluation solver's n steps give up to 2n entries) and
    ``order`` is the evaluations per step, so the pipelines' progress bars count solver steps.

    ``step`` accepts whatever a pipeline passes: ``generator`` (a ``torch.Generator``, or one per sample as
    in diffusers' ``randn_tensor``; ``None``: torch's global generator) feeds the stochastic solvers;
    ``eta`` must be 0 (the pipelines' default, which leaves the solver as configured) or the configured
    solver's own ``eta``; ``use_clipped_model_output`` is accepted with any value — our solvers always take
    the noise from the clipped x0, which is diffusers' ``use_clipped_model_output=True``; other arguments
    with no meaning here are accepted with a warning.

    Attributes:
        solver: the configured :class:`~solvers.Solver`; ``grid``: the solver-time grid of the last
            ``set_timesteps`` (``solvers.sample(model, x_T, solver, timesteps=grid)`` gives the same samples);
        timesteps: the network time of every evaluation; order: evaluations per solver step.

    Raises (at construction):
        ValueError: an adaptive solver (its steps are chosen at run time, so the pipeline cannot be given
            the timesteps in advance), an unknown solver, or a config this library cannot read.
        TypeError: an option that is neither the solver's nor a grid option.
    """

    def __init__(self, solver: str = "dpmpp_2m", *, config: Any = None, **options):
        cfg = config_dict(config if config is not None else {})
        cls = solver_class(solver)
        if cls.adaptive:
            raise ValueError(f"solver {solver!r} chooses its step sizes at run time, so a pipeline cannot be given "
                             "its timesteps in advance; use a fixed-grid solver (e.g. dpmpp_3m, heun) or call "
                             "solvers.sample(solvers.interop.from_diffusers(pipe), ...) directly")
        self.grid_options = {k: options.pop(k) for k in GRID_OPTIONS if k in options}
        try:
            self.solver = get_solver(solver, **options)
        except TypeError as e:
            raise TypeError(f"{e}; grid options: {', '.join(GRID_OPTIONS)}") from None
        self._replay = _Replay()
        self._model = model_from_config(self._replay, cfg)
        self.config = _Config({**cfg, "solver": self.solver.name, "solver_options": self.solver.options(),
                               **self.grid_options})
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self.grid: Optional[list] = None
        self.order = cls.evals_per_step
        self._run: Optional[_Run] = None
        self._warned: set = set()

    @classmethod
    def from_config(cls, config: Any, solver: str = "dpmpp_2m", **options) -> "SolverScheduler":
        """The scheduler for a diffusers scheduler config (or a scheduler), with ``solver`` and its options."""
        return cls(solver, config=config, **options)

    def __len__(self) -> int:
        return self._model.schedule.num_train_timesteps

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the starting noise (1 on the variance-preserving schedules of diffusers)."""
        t = self.grid[0] if self.grid is not None else self._model.schedule.t_max
        return float(self._model.schedule.prior_std(t))

    def set_timesteps(self, num_inference_steps: int, device=None, **kwargs) -> None:
        """Build the grid of ``num_inference_steps`` solver steps and the list of evaluation times.

        Raises:
            ValueError: custom ``timesteps``/``sigmas`` (not supported: give grid options instead), a bad
                step count, or a grid the solver cannot use.
        """
        given = [k for k, v in kwargs.items() if v is not None]
        if given:
            raise ValueError(f"SolverScheduler.set_timesteps does not take {', '.join(given)}; choose the grid "
                             f"with the options {', '.join(GRID_OPTIONS)} of from_config")
        schedule = self._model.schedule
        if self.grid_options:
            opts = {"spacing": self.config.get("timestep_spacing", "leading"), **self.grid_options}
            offset = int(self.config.get("steps_offset", 0) or 0)
            grid = make_grid(schedule, num_inference_steps, steps_offset=offset, **opts)
        else:
            grid = diffusers_grid(self.config, schedule, num_inference_steps)
        run = _Run(self.solver, self._model, self._replay, grid)
        times = torch.tensor(run.model_times, dtype=torch.float64)
        integral = bool((times == times.round()).all())
        self.timesteps = times.to(torch.long if integral else torch.float32).to(device)
        self.grid, self.num_inference_steps, self._run = grid, len(grid) - 1, run
        self.order = max(run.evals_per_step[0], 1)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network input is the state itself."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: Optional[float] = None,
             generator=None, return_dict: bool = True, **kwargs):
        """Hand the network output at ``timestep`` (the next entry of ``timesteps``) to the solver.

        Returns:
            :class:`SolverSchedulerOutput` (or a tuple when ``return_dict=False``) whose ``prev_sample`` is
            the state after the solver step, or — within a step that needs more evaluations — the state at
            which the network is to be called next.
        """
        run = self._run
        if run is None:
            raise RuntimeError("call set_timesteps before step")
        if run.k >= len(self.timesteps):
            raise RuntimeError(f"step was called more than the {len(self.timesteps)} times listed in timesteps; "
                               "call set_timesteps to start a new run")
        self._check_step_arguments(eta, kwargs)
        expected = float(self.timesteps[run.k])
        got = float(torch.as_tensor(timestep).reshape(-1)[0])
        if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"step expected the output at timestep {expected:g} (entry {run.k} of timesteps), got "
                             f"{got:g}: call the network at each entry of scheduler.timesteps, in order")
        model_output = self._main_channels(model_output, sample)
        prev = run.advance(model_output, sample, generator)
        return SolverSchedulerOutput(prev) if return_dict else (prev,)

    def _main_channels(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The prediction of a network that also predicts its variance (twice the channels, learned variance)."""
        if model_output.dim() > 1 and sample.dim() > 1 and model_output.shape[1] == 2 * sample.shape[1] \
                and self.config.get("variance_type") in ("learned", "learned_range"):
            return model_output[:, :sample.shape[1]]
        return model_output

    def _check_step_arguments(self, eta, kwargs: dict) -> None:
        """Refuse an ``eta`` the solver cannot honour; warn once about arguments that have no effect."""
        own = getattr(self.solver, "eta", None)
        if eta is not None and eta != 0 and eta != own:
            where = (f"its eta is {own}: build the scheduler with eta={eta}" if own is not None
                     else f"{self.solver.name} has no eta: choose a solver with one (ddim, dpmpp_2m_sde)")
            raise ValueError(f"step was given eta={eta}, which SolverScheduler({self.solver.name!r}) cannot "
                             f"follow; {where}")
        odd = sorted(k for k, v in kwargs.items() if k != "use_clipped_model_output"
                     and (k not in _NEUTRAL_STEP_KWARGS or v != _NEUTRAL_STEP_KWARGS[k]) and k not in self._warned)
        if odd:
            self._warned.update(odd)
            warnings.warn(f"SolverScheduler({self.solver.name!r}) ignores the step argument(s) {', '.join(odd)}",
                          stacklevel=3)
