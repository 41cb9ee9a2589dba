"""solvers — numerical samplers for diffusion and flow models behind one interface.

    import solvers
    from solvers import schedules
    sched = schedules.VPLinear()
    model = solvers.DiffusionModel(fn, schedule=sched, prediction="eps")
    x_T = solvers.initial_noise((16, 3, 32, 32), seeds=range(16), schedule=sched)
    res = solvers.sample(model, x_T, solver="dpmpp_2m", steps=10)
    res.samples, res.nfe

This package is pure numerics: it depends on torch (and NumPy for seeding) only.
"""
from . import grids, schedules
from .accel import FastNetwork, accelerate
from .base import Point, Solver, StepContext
from .grids import SPACINGS, make_grid, validate_grid
from .inversion import invert
from .loop import NonFiniteError, SampleResult, StepInfo, sample
from .model import PREDICTIONS, DiffusionModel, classifier_free_guidance
from .optimize import OptimizedGrid, optimize_timesteps
from .noise import initial_noise
from .registry import ALIASES, available_solvers, get_solver, register, solver_class
from . import builtin  # noqa: F401  (registers the built-in solvers)

__version__ = "0.1.0"

__all__ = [
    "schedules", "grids", "DiffusionModel", "classifier_free_guidance", "PREDICTIONS", "sample", "invert",
    "SampleResult", "StepInfo", "NonFiniteError", "initial_noise", "available_solvers", "get_solver",
    "solver_class", "register", "ALIASES", "make_grid", "validate_grid", "SPACINGS", "Solver",
    "StepContext", "Point", "accelerate", "FastNetwork", "optimize_timesteps", "OptimizedGrid", "__version__",
]
