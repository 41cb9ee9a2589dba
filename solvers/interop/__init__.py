"""Use the solvers from the code people already have: diffusers pipelines and k-diffusion-style samplers.

    from solvers.interop import SolverScheduler, from_diffusers, from_k_diffusion
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config)                    # the pipeline's method
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m")  # or another
    model = from_diffusers(pipe)                     # a solvers.DiffusionModel
    from solvers.interop.k_diffusion import sample_dpmpp_3m   # k-diffusion's sampler signature

Neither diffusers nor k-diffusion is needed to import this package.  ``SolverScheduler`` is a diffusers
scheduler (a ``SchedulerMixin``), so asking for it imports diffusers, and says how to install it when it is
missing; the other functions import diffusers only to tell a pipeline from a network, and k-diffusion is never
imported (only its calling conventions are followed).
"""
from .diffusers import from_diffusers, model_from_config, schedule_from_config
from .k_diffusion import from_k_diffusion

__all__ = ["from_diffusers", "model_from_config", "schedule_from_config", "SolverScheduler",
           "SolverSchedulerOutput", "from_k_diffusion"]

DIFFUSERS_INSTALL = "pip install 'diffusion-solvers[hub]' (or pip install diffusers)"
_FROM_SCHEDULER = ("SolverScheduler", "SolverSchedulerOutput")


def __getattr__(name: str):
    """``SolverScheduler`` and its output class, imported with diffusers on first use."""
    if name not in _FROM_SCHEDULER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import scheduler
    except ImportError as e:
        if "diffusers" not in str(e):
            raise
        raise ImportError(f"solvers.interop.{name} is a diffusers scheduler and needs diffusers, which is not "
                          f"installed: {DIFFUSERS_INSTALL}") from None
    return getattr(scheduler, name)
