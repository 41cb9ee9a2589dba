"""``SolverScheduler``: any fixed-grid solver of this library as a genuine diffusers scheduler.

    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config)                    # the pipeline's method
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m")  # another one

It is a ``SchedulerMixin`` + ``ConfigMixin``: ``save_pretrained``/``from_pretrained``/``from_config`` round-trip,
a pipeline holding it saves and loads back, and ``compatibles`` lists the schedulers whose configs it reads.
The config keeps every key of the source scheduler's config (diffusers' meaning: a key a config did not set
takes the default of the method's diffusers counterpart, as diffusers' own one-line swap does), plus ``solver``,
``solver_options`` and ``source_scheduler``.  :mod:`solvers.interop.diffusers_config` says which method and which
grid a config describes; :mod:`solvers.interop.replay` drives the solver one network evaluation at a time.

The pipeline's state is the library's: x = α·x0 + σ·ε (VP) or x = (1 − t)·x0 + t·ε (flow), so
``init_noise_sigma`` is 1 and ``scale_model_input`` returns its input; ``add_noise`` / ``scale_noise`` make that
state.  The samples at the end are those of diffusers' scheduler of the same method (σ-schedulers such as
Euler carry x/α instead, the same trajectory scaled).

This module imports diffusers; ``solvers.interop`` imports it only when ``SolverScheduler`` is asked for.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..grids import make_grid
from ..registry import get_solver, solver_class
from ..schedules import RectifiedFlow
from . import diffusers_config as dc
from .diffusers import config_dict, model_from_config
from .replay import EvaluationPlan, Replay, Run

__all__ = ["SolverScheduler", "SolverSchedulerOutput"]

GRID_OPTIONS = ("spacing", "t_start", "t_end", "denoise_to_zero")
OWN_KEYS = ("solver", "solver_options", "source_scheduler") + GRID_OPTIONS
# Step arguments of diffusers' schedulers that carry no instruction for our solvers at these values.
_NEUTRAL_STEP_KWARGS = {"variance_noise": None, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
# σ-schedulers: they carry the state in VE form, x/α, and the pipelines built for them scale the network input
# (scale_model_input) and the starting noise (init_noise_sigma).  SolverScheduler carries x/α too when both the
# source and the method's counterpart are such schedulers, so it reproduces them step for step; otherwise it
# carries x, which also works in pipelines that call neither (DDPMPipeline).
VE_STATE = ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
SIGMA_SOURCES = VE_STATE + ("EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                            "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler")
# The schedulers whose configs SolverScheduler reads (diffusers' ``compatibles``).
COMPATIBLES = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
               "UniPCMultistepScheduler", "DEISMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
               "IPNDMScheduler", "FlowMatchEulerDiscreteScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


@dataclass
class SolverSchedulerOutput(BaseOutput):
    """What ``step`` returns.

    Attributes:
        prev_sample: the state after the solver step or, within a step that needs more evaluations, the state at
            which the network is to be called next (``[0]`` of the output, as diffusers' ``SchedulerOutput``).
        pred_original_sample: the model's x0 at this evaluation (clipped or thresholded as configured).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _given(values: dict) -> dict:
    """The source-config keys that were set (``None`` means "not given": the counterpart's default applies)."""
    return {k: v for k, v in values.items() if k not in OWN_KEYS and k != "self" and v is not None}


class SolverScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples with one of this library's fixed-grid solvers.

    Build it from a pipeline's scheduler config with :meth:`from_config`; ``solver`` omitted reproduces the
    source scheduler's own method (DPMSolverMultistep order 2 → ``dpmpp_2m``, UniPC → ``unipc``, DDIM → ``ddim``,
    FlowMatchEuler → ``euler`` on the rectified-flow schedule, …); ``solver="dpmpp_3m"`` and its options choose
    another (options that contradict the config win, with a warning naming the keys overridden).

    ``set_timesteps(n)`` builds the grid the config describes (spacing, sigma family, final step, flow shift;
    or ``timesteps=`` / ``sigmas=`` given by hand, or the grid options ``spacing``/``t_start``/``t_end``/
    ``denoise_to_zero``); ``timesteps`` then lists the network time of *every* evaluation (a two-evaluation
    solver's n steps give up to 2n entries) and ``order`` is the evaluations per step, so the pipelines'
    progress bars and ``timesteps[t_start * order:]`` count solver steps.  ``step`` may begin at any step of the
    grid (img2img, inpainting: ``set_begin_index``, or the first timestep it is given).

    ``step`` accepts what pipelines pass: ``generator`` (one, or one per sample as in diffusers'
    ``randn_tensor``; ``None``: torch's global generator) feeds the stochastic solvers; ``eta`` must be 0 (the
    pipelines' default) or the configured solver's own ``eta``; ``use_clipped_model_output`` with any value
    (our solvers take the noise from the clipped x0); other arguments with no meaning here warn once.

    Attributes:
        solver: the configured :class:`~solvers.Solver`; grid: the solver-time grid of the last
            ``set_timesteps`` (``solvers.sample(model, x_T, solver, timesteps=grid)`` gives the same samples);
        timesteps: the network time of every evaluation; sigmas: diffusers' σ at each grid point (σ/α; flow: t).
    """

    _compatibles = list(COMPATIBLES)
    order = 1

    @register_to_config
    def __init__(self, solver: Optional[str] = None, solver_options: Optional[dict] = None,
                 source_scheduler: Optional[str] = None, spacing: Optional[str] = None,
                 t_start: Optional[float] = None, t_end: Optional[float] = None,
                 denoise_to_zero: Optional[bool] = None,
                 num_train_timesteps: Optional[int] = None, beta_start: Optional[float] = None,
                 beta_end: Optional[float] = None, beta_schedule: Optional[str] = None, trained_betas=None,
                 prediction_type: Optional[str] = None, variance_type: Optional[str] = None,
                 clip_sample: Optional[bool] = None, clip_sample_range: Optional[float] = None,
                 thresholding: Optional[bool] = None, dynamic_thresholding_ratio: Optional[float] = None,
                 sample_max_value: Optional[float] = None, set_alpha_to_one: Optional[bool] = None,
                 steps_offset: Optional[int] = None, timestep_spacing: Optional[str] = None,
                 rescale_betas_zero_snr: Optional[bool] = None, solver_order: Optional[int] = None,
                 algorithm_type: Optional[str] = None, solver_type: Optional[str] = None,
                 lower_order_final: Optional[bool] = None, euler_at_final: Optional[bool] = None,
                 use_karras_sigmas: Optional[bool] = None, use_exponential_sigmas: Optional[bool] = None,
                 use_beta_sigmas: Optional[bool] = None, use_lu_lambdas: Optional[bool] = None,
                 use_flow_sigmas: Optional[bool] = None, flow_shift: Optional[float] = None,
                 final_sigmas_type: Optional[str] = None, lambda_min_clipped: Optional[float] = None,
                 predict_x0: Optional[bool] = None, disable_corrector=None,
                 solver_p=None, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 interpolation_type: Optional[str] = None, timestep_type: Optional[str] = None,
                 shift: Optional[float] = None, use_dynamic_shifting: Optional[bool] = None,
                 base_shift: Optional[float] = None, max_shift: Optional[float] = None,
                 base_image_seq_len: Optional[int] = None, max_image_seq_len: Optional[int] = None,
                 invert_sigmas: Optional[bool] = None, shift_terminal: Optional[float] = None,
                 stochastic_sampling: Optional[bool] = None, time_shift_type: Optional[str] = None,
                 skip_prk_steps: Optional[bool] = None):
        given = _given(dict(locals()))
        self._setup(given, solver, dict(solver_options or {}), source_scheduler,
                    {k: v for k, v in (("spacing", spacing), ("t_start", t_start), ("t_end", t_end),
                                       ("denoise_to_zero", denoise_to_zero)) if v is not None})

    def _setup(self, given: dict, solver: Optional[str], options: dict, source: Optional[str], grid_options: dict):
        """Choose the method and read the schedule; refuse what cannot be honoured before any sampling."""
        given = {**_training_defaults(source), **given}
        choice = dc.resolve_method(given, source, solver, options, defaults_of=_init_defaults)
        given = dc.flow_source_keys(given, source, choice.counterpart)
        if solver_class(choice.solver).adaptive:
            raise ValueError(f"solver {choice.solver!r} chooses its step sizes at run time, so a pipeline cannot be "
                             "given its timesteps in advance; use a fixed-grid solver (e.g. dpmpp_3m, heun) or call "
                             "solvers.sample(solvers.interop.from_diffusers(pipe), ...) directly")
        try:
            self.solver = get_solver(choice.solver, **choice.options)
        except TypeError as e:
            raise TypeError(f"{e}; grid options: {', '.join(GRID_OPTIONS)}") from None
        if choice.overridden:
            warnings.warn(f"SolverScheduler({choice.solver!r}): your options override the config's "
                          f"{', '.join(choice.overridden)}", stacklevel=4)
        self.counterpart = choice.counterpart
        self._ve = choice.counterpart in VE_STATE and source in SIGMA_SOURCES
        self.effective_config = _effective_config(given, choice.counterpart)
        dc.check_config(self.effective_config, choice.counterpart)
        self._register_effective(given)
        self._replay = Replay()
        self._model = model_from_config(self._replay, self.effective_config)
        self.grid_options = grid_options
        self.num_inference_steps: Optional[int] = None
        self.grid: Optional[list] = None
        self.sigmas: Optional[torch.Tensor] = None
        self._plan: Optional[EvaluationPlan] = None
        self._net_of: dict = {}
        self._run: Optional[Run] = None
        self._begin_index: Optional[int] = None
        self._warned: set = set()
        self._solver = self.solver  # the solver of the next run (a step's eta may change it)
        self.order = solver_class(choice.solver).evals_per_step
        n = int(self.effective_config.get("num_train_timesteps", 1000))
        self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.long)
        if isinstance(self._model.schedule, RectifiedFlow):  # FlowMatchEuler's: σ·N of its (shifted) training σ
            sigmas = torch.linspace(1, n, n, dtype=torch.float64).flip(0) / n
            if not self.effective_config.get("use_dynamic_shifting"):
                shift = float(self.effective_config.get("shift", self.effective_config.get("flow_shift", 1.0)) or 1.0)
                sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
            self.timesteps = (sigmas * n).to(torch.float32)
        self._set_tables()

    def _set_tables(self) -> None:
        """diffusers' public β/ᾱ tables (float32) of a discrete schedule: ``betas``, ``alphas``,
        ``alphas_cumprod`` (pipelines and training code read them)."""
        abar = getattr(self._model.schedule, "alphas_cumprod", None)
        if abar is None:
            self.betas = self.alphas = self.alphas_cumprod = None
            return
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        given = self.effective_config.get("trained_betas")
        self.betas = (torch.as_tensor(given, dtype=torch.float32) if given is not None
                      else (1 - abar / prev).to(torch.float32))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = abar.to(torch.float32)

    def previous_timestep(self, timestep) -> float:
        """The timestep of the evaluation after ``timestep`` on the grid (−1 after the last), as DDPM's."""
        self._ensure_plan()
        times = self.timesteps.tolist()
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        k = next((i for i, v in enumerate(times) if math.isclose(v, t, abs_tol=1e-6)), None)
        if k is None:
            raise ValueError(f"timestep {t:g} is not one of scheduler.timesteps")
        nxt = times[k + 1] if k + 1 < len(times) else -1
        return torch.tensor(nxt)

    def _register_effective(self, given: dict) -> None:
        """Show the values in use in ``config`` (pipelines read keys such as ``use_dynamic_shifting`` from it): the
        counterpart's defaults stay listed as defaults (another scheduler loading this config takes its own), the
        source's training values do not (they describe the network, whichever scheduler reads them)."""
        keys = set(self._get_init_keys(type(self))) - {"self"} - set(OWN_KEYS)
        shown = {k: v for k, v in self.effective_config.items() if k in keys and v is not None}
        defaults = sorted((set(self.config.get("_use_default_values", [])) - set(given)) | (set(shown) - set(given)))
        # A config loaded from a file set every key (files do not keep _use_default_values): none is listed then.
        self.register_to_config(**shown, **({"_use_default_values": defaults} if defaults else {}))

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs):
        """The scheduler for a diffusers scheduler's config (or a scheduler, or a saved folder's config).

        ``solver`` (omitted: the source scheduler's own method) and the solver's options may be given as keyword
        arguments; a keyword that is a solver option is one (it overrides a config key of the same name, with
        a warning), any other is a config key with diffusers' meaning.

        Raises:
            ValueError: a config key that cannot be honoured (named, with what to do), an adaptive solver.
            TypeError: a keyword that is neither a config key nor an option of the solver.
        """
        cfg = dict(config_dict(config) if config is not None else {})
        if "source_scheduler" not in kwargs and cfg.get("source_scheduler") is None:
            kwargs["source_scheduler"] = _source_class(config, cfg)
            if kwargs["source_scheduler"] is None and kwargs.get("solver") is None and cfg.get("solver") is None \
                    and any(not k.startswith("_") for k in cfg):
                raise ValueError("cannot tell which diffusers scheduler this config comes from (no _class_name, and "
                                 "its keys are no scheduler's): pass solver=, or the scheduler itself "
                                 "(SolverScheduler.from_config(pipe.scheduler))")
        kwargs = cls._route_options(cfg, kwargs)
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _route_options(cls, cfg: dict, kwargs: dict) -> dict:
        """Move the keywords that are options of the chosen solver into ``solver_options``."""
        keys = set(cls._get_init_keys(cls)) - {"self"}
        solver = kwargs.get("solver", cfg.get("solver"))
        if solver is None:
            solver = dc.method_from_config({k: v for k, v in cfg.items() if not k.startswith("_")},
                                           kwargs.get("source_scheduler") or cfg.get("source_scheduler"))[0]
        fields = {f for f in getattr(solver_class(solver), "__dataclass_fields__", {})}
        # The config's options belong to the config's solver: another solver starts from its own defaults.
        same = solver_class(solver) is solver_class(cfg["solver"]) if cfg.get("solver") else False
        options = dict(kwargs.pop("solver_options", None) or (cfg.get("solver_options") if same else None) or {})
        for k in list(kwargs):
            if k in fields:
                options[k] = kwargs.pop(k)
            elif k not in keys:
                valid = ", ".join(sorted(fields)) or "none"
                raise TypeError(f"{k!r} is neither an option of solver {solver!r} ({valid})"
                                f" nor a scheduler config key; grid options: {', '.join(GRID_OPTIONS)}")
        kwargs["solver_options"] = options or None
        return kwargs

    def __len__(self) -> int:
        return int(self.effective_config.get("num_train_timesteps", 1000))

    @property
    def init_noise_sigma(self) -> float:
        """The factor of the starting noise: 1 where the state is x (α·x0 + σ·ε, α² + σ² = 1 at the start, or the
        flow's (1 − t)·x0 + t·ε); for a σ-scheduler counterpart (state x/α) diffusers' value, √(σ_max² + 1), or
        σ_max with linspace/trailing spacing (diffusers' approximation, kept so the samples match)."""
        if not self._ve:
            return 1.0
        sigma = _diffusers_sigma(self._model.schedule, self.grid[0] if self.grid else self._model.schedule.t_max)
        if self.effective_config.get("timestep_spacing") not in ("linspace", "trailing"):
            sigma = (sigma * sigma + 1.0) ** 0.5
        return torch.tensor(sigma, dtype=torch.float32)  # a tensor, as diffusers' σ-schedulers give it

    @property
    def begin_index(self) -> Optional[int]:
        """The entry of ``timesteps`` the next run begins at (``set_begin_index``), or None."""
        return self._begin_index

    @property
    def step_index(self) -> Optional[int]:
        """The entry of ``timesteps`` the run waits for, or None before the run's first ``step``."""
        return None if self._run is None else self._run.position

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Begin the next run at entry ``begin_index`` of ``timesteps`` (the first evaluation of a solver step)."""
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network input at ``timestep``: the state itself, or x = α·(x/α) for a σ-scheduler counterpart."""
        if not self._ve:
            return sample
        return sample * self._alpha(float(self._solver_times(timestep)[0]), sample)

    def _alpha(self, t: float, like: torch.Tensor) -> torch.Tensor:
        """α at solver time t as a scalar tensor of ``like``'s dtype and device."""
        return self._model.schedule.alpha(torch.tensor(float(t), dtype=torch.float64)).to(like.device, like.dtype)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None, sigmas=None,
                      mu: Optional[float] = None) -> None:
        """Build the grid of ``num_inference_steps`` solver steps (or the given ``timesteps`` / ``sigmas``, as
        diffusers' schedulers take them) and the list of evaluation times; ``mu``: the flow pipelines' shift for
        ``use_dynamic_shifting``.

        Raises:
            ValueError: a bad step count, a custom list the method cannot use, or a grid the solver cannot use.
        """
        schedule = self._model.schedule
        if self.grid_options:
            if timesteps is not None or sigmas is not None:
                raise ValueError("timesteps=/sigmas= and the grid options "
                                 f"{', '.join(self.grid_options)} both choose the grid: give one of them")
            grid = make_grid(schedule, num_inference_steps, **self.grid_options)
            network = [float(schedule.model_time(t)) for t in grid[:-1]]
        else:
            found = dc.inference_grid(self.effective_config, schedule, num_inference_steps,
                                      counterpart=self.counterpart, mu=mu, timesteps=timesteps, sigmas=sigmas)
            grid, network = list(found.grid), list(found.network_times)
        plan = EvaluationPlan.of(self.solver, self._model, grid, self._replay)
        if plan.moves_first[0]:
            Run(self.solver, self._model, self._replay, plan, 0, [])  # raises: says which level to keep out
        times = torch.tensor(self._network_times(plan, dict(zip(grid[:-1], network))), dtype=torch.float64)
        integral = bool((times == times.round()).all())
        self.timesteps = times.to(torch.long if integral else torch.float32).to(device)
        self.sigmas = torch.tensor([_diffusers_sigma(schedule, t) for t in grid], dtype=torch.float32).to(device)
        self.grid, self.num_inference_steps, self._plan = grid, len(grid) - 1, plan
        self._net_of = dict(zip(grid[:-1], network))
        self._run, self._begin_index = None, None
        self.order = max(plan.evals_per_step[0], 1)

    def _network_times(self, plan: EvaluationPlan, at: dict) -> list:
        """The network time of each evaluation of ``plan``: diffusers' timestep at a grid point, else the
        schedule's (a stage between grid points)."""
        return [at.get(t, float(self._model.schedule.model_time(t))) for t in plan.times]

    def _ensure_plan(self) -> None:
        """Before ``set_timesteps``, diffusers' schedulers step on their training grid (every trained timestep):
        so does this one."""
        if self._plan is None:
            begin = self._begin_index
            self.set_timesteps(len(self))
            self.num_inference_steps, self._begin_index = None, begin

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: Optional[float] = None,
             generator=None, return_dict: bool = True, **kwargs):
        """Hand the network output at ``timestep`` (an entry of ``timesteps``) to the solver.

        The first call of a run begins at ``begin_index`` if one is set, else at the first solver step whose
        first evaluation is at ``timestep``; later calls continue the run, or begin a new one at ``timestep``
        (a step of the grid, or any time: then the first step goes from there to the next level of the grid), so
        a loop may start anywhere.  Before ``set_timesteps`` the grid is every trained timestep, as in diffusers.

        Returns:
            :class:`SolverSchedulerOutput` (a tuple ``(prev_sample, pred_original_sample)`` with
            ``return_dict=False``).
        """
        self._check_step_arguments(eta, kwargs)
        self._ensure_plan()
        run = self._run_for(timestep)
        model_output = self._main_channels(model_output, sample)
        times = run.plan.times
        t_in = times[run.position]
        if self._ve:  # the pipeline's state is x/α: the solver's is x
            sample = sample * self._alpha(t_in, sample)
        x0 = run.x0(model_output, sample, t_in)
        prev = run.advance(model_output, sample, generator)
        if self._ve:
            prev = prev / self._alpha(times[run.position] if run.position < len(times) else run.plan.grid[-1], prev)
        return SolverSchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def _run_for(self, timestep) -> Run:
        """The run that takes the output at ``timestep``: the current one, or a new one beginning there."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        run, plan = self._run, self._plan
        if run is not None and run.position < len(run.network_times) \
                and math.isclose(run.network_times[run.position], t, abs_tol=1e-6):
            return run
        times, starts = self.timesteps.tolist(), plan.step_starts
        if run is None and self._begin_index is not None:
            k = self._begin_index
            if k not in starts or not math.isclose(times[k], t, abs_tol=1e-6):
                raise ValueError(f"begin_index {k} must be the first evaluation of a solver step (one of {starts}) "
                                 f"and the first step must be given its timestep {times[k] if k < len(times) else '?'}"
                                 f", got {t:g}")
        else:
            matches = [k for k in starts if math.isclose(times[k], t, abs_tol=1e-6)]
            if not matches:
                return self._run_off_grid(t)
            k = matches[0]
        self._run = Run(self._solver, self._model, self._replay, plan, starts.index(k), times)
        return self._run

    def _run_off_grid(self, timestep: float) -> Run:
        """A run that begins at a time off the grid: its first step goes to the grid's next level below."""
        schedule = self._model.schedule
        t = timestep / float(getattr(schedule, "time_scale", 1.0))
        below = [g for g in self._plan.grid if g < t]
        if not below and schedule.t_zero <= t < self._plan.grid[-2]:
            # diffusers' multistep rule for a timestep not on the grid, below its levels: the grid's last step.
            first = len(self._plan.grid) - 2
            self._run = Run(self._solver, self._model, self._replay, self._plan, first, self.timesteps.tolist())
            return self._run
        if not below or not schedule.t_min <= t <= schedule.t_max:
            raise ValueError(f"step was given timestep {timestep:g}, which is not in the range the model can be "
                             f"evaluated at or has no level of the grid below it: call the network at the entries "
                             f"of scheduler.timesteps")
        plan = EvaluationPlan.of(self.solver, self._model, [t] + below, self._replay)
        self._run = Run(self._solver, self._model, self._replay, plan, 0,
                        self._network_times(plan, {**self._net_of, t: timestep}))
        return self._run

    def _solver_times(self, timesteps) -> torch.Tensor:
        """Solver times for ``add_noise`` and ``scale_model_input``: the run's next evaluation where the timestep is
        it, the grid's where ``begin_index`` or a timestep of the grid says (diffusers' rule: ``begin_index``
        before the first step, the run's position after it); other timesteps directly."""
        ts = torch.as_tensor(timesteps).reshape(-1).to(torch.float64).cpu()
        run = self._run
        if run is not None and run.position < len(run.plan.times) and ts.numel() == 1 \
                and math.isclose(float(run.network_times[run.position]), float(ts[0]), abs_tol=1e-6):
            return torch.full_like(ts, float(run.plan.times[run.position]))
        if self._plan is not None and self._begin_index is not None:
            times = self._plan.times if run is None else run.plan.times
            k = run.position if run is not None else self._begin_index
            return torch.full_like(ts, float(times[min(k, len(times) - 1)]))
        scale = float(getattr(self._model.schedule, "time_scale", 1.0))
        out = ts / scale
        if self._plan is not None:
            times = self.timesteps.to(torch.float64).cpu()
            for i, t in enumerate(ts.tolist()):
                hit = (times - t).abs() <= 1e-6
                if bool(hit.any()):
                    out[i] = float(self._plan.times[int(hit.nonzero()[0])])
        return out

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The state at ``timesteps`` (one per sample, or one for all) of data ``original_samples`` and standard
        normal ``noise``: α·x0 + σ·ε (x0 + (σ/α)·ε for a σ-scheduler counterpart), this scheduler's state, so a
        pipeline may begin mid-grid (img2img, inpainting)."""
        t = self._solver_times(timesteps)
        sched = self._model.schedule
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        if self._ve:
            alpha, sigma = torch.ones_like(alpha), sigma / alpha
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).reshape(shape)
        sigma = sigma.to(original_samples.device, original_samples.dtype).reshape(shape)
        return alpha * original_samples + sigma * noise.to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """The flow pipelines' name for :meth:`add_noise` (``scale_noise(sample, timestep, noise)``)."""
        return self.add_noise(sample, noise, timestep)

    def _main_channels(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The prediction of a network that also predicts its variance (twice the channels, learned variance)."""
        if model_output.dim() > 1 and sample.dim() > 1 and model_output.shape[1] == 2 * sample.shape[1] \
                and self.effective_config.get("variance_type") in ("learned", "learned_range"):
            return model_output[:, :sample.shape[1]]
        return model_output

    def _check_step_arguments(self, eta, kwargs: dict) -> None:
        """Take a run's ``eta`` (a solver with one follows a non-zero eta from the step, as diffusers' DDIM does;
        0 leaves it as configured); refuse one it cannot follow; warn once about arguments with no effect."""
        own = getattr(self.solver, "eta", None)
        wanted = own if eta is None or eta == 0 else eta
        if wanted != own and own is None:
            raise ValueError(f"step was given eta={eta}, which SolverScheduler({self.solver.name!r}) cannot "
                             f"follow: {self.solver.name} has no eta; choose a solver with one (ddim, dpmpp_2m_sde)")
        if self._run is not None and wanted != getattr(self._run.solver, "eta", None) \
                and self._run.position < len(self._run.network_times):
            raise ValueError(f"step was given eta={eta} in the middle of a run that uses eta="
                             f"{getattr(self._run.solver, 'eta', None)}: give every step of a run the same eta")
        self._solver = self.solver if wanted == own else dataclasses.replace(self.solver, eta=float(wanted))
        odd = sorted(k for k, v in kwargs.items() if k != "use_clipped_model_output"
                     and (k not in _NEUTRAL_STEP_KWARGS or v != _NEUTRAL_STEP_KWARGS[k]) and k not in self._warned)
        if odd:
            self._warned.update(odd)
            warnings.warn(f"SolverScheduler({self.solver.name!r}) ignores the step argument(s) {', '.join(odd)}",
                          stacklevel=3)


# The keys that say how the network was trained: a swap keeps the source's values, defaults included (diffusers'
# own swap would give a DDPM network built in code Heun's default β range, 0.00085 … 0.012, instead of its own).
TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def _init_defaults(name: Optional[str]) -> dict:
    """The constructor defaults of the diffusers scheduler class ``name`` (none for an unknown name)."""
    import diffusers
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, SchedulerMixin):
        return {}
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k not in ("self", "kwargs") and p.default is not inspect.Parameter.empty}


def _effective_config(given: dict, counterpart: str) -> dict:
    """diffusers' from_config semantics: the keys a config did not set take the counterpart's defaults (a
    FlowMatchEuler counterpart predicts the flow velocity, which its config does not say)."""
    out = {**_init_defaults(counterpart), **given}
    if counterpart == dc.FLOW_SCHEDULER:
        out.setdefault("prediction_type", "flow_prediction")
    return out


def _training_defaults(source: Optional[str]) -> dict:
    """The source scheduler class's defaults for :data:`TRAINING_KEYS` (none for an unknown source)."""
    defaults = _init_defaults(source)
    return {k: defaults[k] for k in TRAINING_KEYS if defaults.get(k) is not None}


def _source_class(config: Any, cfg: dict) -> Optional[str]:
    """The diffusers scheduler class a config comes from: the scheduler given, the config's ``_class_name``
    (configs loaded from a file carry it), or the one compatible class whose constructor takes exactly the
    config's keys (a scheduler built in code); None when none of these says."""
    if isinstance(config, SchedulerMixin) and not isinstance(config, SolverScheduler):
        return type(config).__name__
    name = cfg.get("_class_name")
    if isinstance(name, str) and name != SolverScheduler.__name__:
        return name
    if name is not None:
        return None
    import diffusers
    keys = {k for k in cfg if not k.startswith("_")}
    # A config made by another scheduler's from_config also keeps that one's keys: the source is the class with
    # the most keys among those whose keys the config all has.
    inits = {n: set(inspect.signature(getattr(diffusers, n).__init__).parameters) - {"self", "kwargs"}
             for n in COMPATIBLES if hasattr(diffusers, n)}
    inside = {n: k for n, k in inits.items() if k <= keys}
    most = max((len(k) for k in inside.values()), default=0)
    found = [n for n, k in inside.items() if len(k) == most]
    if len(found) > 1:
        raise ValueError(f"this config could come from any of {', '.join(found)} (the same keys, different "
                         "defaults): pass the scheduler itself, from_config(pipe.scheduler), or source_scheduler=")
    return found[0] if found else None


def _diffusers_sigma(schedule, t: float) -> float:
    """diffusers' σ at solver time t: σ/α on the variance-preserving schedules, t itself on a flow."""
    if isinstance(schedule, RectifiedFlow):
        return float(t)
    alpha = float(schedule.alpha(torch.tensor(float(t), dtype=torch.float64)))
    sigma = float(schedule.sigma(torch.tensor(float(t), dtype=torch.float64)))
    return sigma / alpha if alpha > 0 else math.inf
