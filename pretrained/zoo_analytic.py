"""Cards of the exact analytic models: ``gmm2d``, ``gmm`` (64-D) and ``gaussian``."""
from __future__ import annotations

from typing import Optional

import torch

import solvers
from solvers import schedules

from .analytic import GaussianMixture, gaussian, gmm2d, gmm_nd
from .cards import ModelCard, register_card


def _analytic_card(name: str, mixture: GaussianMixture, description: str, **extra) -> ModelCard:
    default_schedule = schedules.VPLinear()

    def loader(*, device: str = "cpu", dtype: Optional[torch.dtype] = None, schedule=None,
               prediction: str = "eps", weights=None, **kw) -> solvers.DiffusionModel:
        if weights is not None:
            raise ValueError(f"{name} is an analytic model: it has no weights to load")
        return mixture.as_model(schedule or default_schedule, prediction, **kw)

    def exact_ode(x_T: torch.Tensor, t_from: float, t_to: float, schedule=None) -> torch.Tensor:
        sched = schedule or default_schedule
        if mixture.means.shape[0] == 1:
            return mixture.flow_map(sched, x_T, t_from, t_to)
        return mixture.ode_solution(sched, x_T, t_from, t_to, rtol=1e-9, atol=1e-11, per_sample=False)

    return register_card(ModelCard(
        name=name, kind="analytic", description=description, loader=loader,
        sample_shape=(mixture.dim,), prediction="eps", schedule_name="VPLinear(β_min=0.1, β_max=20)",
        data_range=(float((mixture.means - 3 * mixture.stds[:, None]).min()),
                    float((mixture.means + 3 * mixture.stds[:, None]).max())),
        reference="exact", data_sampler=lambda n, seed=0: mixture.sample(n, seed), exact_ode=exact_ode,
        default_num_samples=2000, default_batch_size=2000,
        notes="Exact closed-form denoiser: solver error can be measured exactly.",
        extra={"mixture": mixture, "schedule": default_schedule, **extra}))


_analytic_card("gmm2d", gmm2d("ring"),
               "8 Gaussians (std 0.3) on a ring of radius 4 in 2-D: the point cloud of the classic diffusion "
               "illustrations, with its exact ε on every schedule.")
_analytic_card("gmm", gmm_nd(dim=64, n_components=4),
               "A 4-component Gaussian mixture in 64-D (means drawn once with seed 0), exact ε.")
_analytic_card("gaussian", gaussian(dim=2),
               "N(0.5·1, 0.7²·I) in 2-D: exact ε and the exact probability-flow map (affine).")
