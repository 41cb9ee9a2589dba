"""Per-sample random streams: sample i's noise depends on its own seed only, never on its batch.

Each sample owns a ``torch.Generator`` on the CPU, seeded from (seed, stream) through NumPy's
``SeedSequence``; draws are made per sample and moved to the target device.  The initial noise (stream 0)
and the noise injected by stochastic solvers (stream 1) are independent streams of the same seed.  Drawing
on the CPU makes the noise identical on every device, so a GPU run can be checked against a CPU run.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

STREAM_INITIAL = 0
STREAM_SOLVER = 1

__all__ = ["SeedStreams", "as_seeds", "initial_noise"]


def as_seeds(seeds: Union[None, int, Sequence[int], torch.Tensor, np.ndarray], batch: int) -> list[int]:
    """Normalise ``seeds`` to one non-negative int per sample (``None`` → 0 … batch−1)."""
    if seeds is None:
        return list(range(batch))
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        raise ValueError(f"seeds must have one entry per sample (got the single int {seeds}); "
                         f"use e.g. range({seeds}, {seeds} + batch)")
    values = seeds.tolist() if hasattr(seeds, "tolist") else list(seeds)
    if len(values) != batch:
        raise ValueError(f"seeds has {len(values)} entries for a batch of {batch}; give one seed per sample")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"seeds must be non-negative integers, got {v!r}")
        out.append(int(v))
    return out


def _generator_seed(seed: int, stream: int) -> int:
    state = np.random.SeedSequence(entropy=seed, spawn_key=(stream,)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeedStreams:
    """One CPU generator per sample for one stream; :meth:`randn` draws a batch of per-sample noise."""

    def __init__(self, seeds: Sequence[int], stream: int):
        self.seeds = list(seeds)
        self.generators = []
        for s in self.seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(_generator_seed(s, stream))
            self.generators.append(g)

    def randn(self, sample_shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """A (batch, *sample_shape) tensor of standard normals, row i from sample i's generator."""
        draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        shape = tuple(sample_shape)
        out = torch.empty((len(self.generators), *shape), dtype=draw_dtype)
        # Each row drawn in place from its own generator (the same numbers as a fresh randn per row, without
        # a second batch-sized tensor to stack them into).
        for g, row in zip(self.generators, out):
            torch.randn(shape, generator=g, out=row)
        return out.to(device=device, dtype=dtype, non_blocking=True)


def initial_noise(shape: Sequence[int], seeds=None, *, schedule=None, t: Optional[float] = None,
                  dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The starting state x_T for :func:`solvers.sample`, drawn per sample.

    Args:
        shape: full shape (batch, …).
        seeds: one seed per sample (``None`` → 0 … batch−1).
        schedule: when given, the noise is scaled by ``schedule.prior_std(t)`` (1 on VP schedules, σ on
            EDM, so x_T = σ_max·z there).
        t: the start time (default ``schedule.t_max``).

    Returns:
        A tensor of the given shape; row i depends on seeds[i] only.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must include the batch dimension")
    x = SeedStreams(as_seeds(seeds, shape[0]), STREAM_INITIAL).randn(shape[1:], dtype=dtype, device=device)
    if schedule is not None:
        x = x * schedule.prior_std(schedule.t_max if t is None else t)
    return x
