"""What the harness tests share that is not a fixture: a cheap exact image model for end-to-end sweeps."""
from __future__ import annotations

import torch

from pretrained.analytic import GaussianMixture
from pretrained.cards import ModelCard
from solvers import schedules


def mixture_image_card(name: str, reference: str = "mnist-test") -> ModelCard:
    """A cheap exact 'image model': a two-component Gaussian mixture over 1×28×28 images in [−1, 1]."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(2, 784, generator=g, dtype=torch.float64) * 1.6 - 0.8
    mixture, schedule = GaussianMixture(means, 0.2), schedules.VPLinear()
    return ModelCard(name=name, kind="image", description="test image mixture",
                     loader=lambda device="cpu", **kw: mixture.as_model(schedule, "eps"), sample_shape=(1, 28, 28),
                     prediction="eps", schedule_name="VPLinear", reference=reference,
                     to_images=lambda x: ((x + 1) / 2).clamp(0, 1), default_num_samples=64, default_batch_size=32)
