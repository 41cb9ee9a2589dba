"""Use the solvers from the code people already have: diffusers pipelines and k-diffusion-style samplers.

    from solvers.interop import SolverScheduler, from_diffusers, from_k_diffusion
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m")
    model = from_diffusers(pipe)                     # a solvers.DiffusionModel
    from solvers.interop.k_diffusion import sample_dpmpp_3m   # k-diffusion's sampler signature

Neither diffusers nor k-diffusion is needed to import this package: diffusers is imported inside the
functions that read its objects, and k-diffusion is never imported (only its calling conventions are
followed).
"""
from .diffusers import from_diffusers, model_from_config, schedule_from_config
from .k_diffusion import from_k_diffusion
from .scheduler import SolverScheduler, SolverSchedulerOutput

__all__ = ["from_diffusers", "model_from_config", "schedule_from_config", "SolverScheduler",
           "SolverSchedulerOutput", "from_k_diffusion"]
