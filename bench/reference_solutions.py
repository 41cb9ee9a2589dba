"""High-accuracy reference solutions of a model's own probability-flow ODE: quality without data.

For a model with no exact solution and no reference data (your own model), a deterministic cell is scored by
the RMS difference between its samples and a numerical solution of the same ODE, from the same x_T, over the
same time range: from the cell's first grid time to its last one, or — where the cell's grid ends at σ = 0 —
down to the schedule's smallest usual noise level (``default_t_end``, e.g. t = 1e-3 on VPLinear, the first
trained index on a DiscreteVP) and then denoised, which stands for the ODE's end point at σ = 0.  The solution is DPM-Solver++(3M) with
:data:`REF_STEPS` log-SNR steps; its own error is *measured*, not assumed: the same solve with half the steps
differs from it by about 7× its error (third order: 2³ − 1), and that estimate is stated with every cell.

Cost: (REF_STEPS + REF_STEPS / 2) model calls per sample, once per distinct (grid start, grid end) of the
sweep; the solutions are cached in ``OUT/reference_solutions/`` keyed by a hash of x_T, the time range, the
model and the run settings, so a resumed or extended sweep reuses them.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import solvers

from .results import atomic_write_bytes

__all__ = ["ReferenceSolutions", "REF_SOLVER", "REF_STEPS", "CACHE_FOLDER"]

REF_SOLVER = "dpmpp_3m"
REF_STEPS = 250
CACHE_FOLDER = "reference_solutions"
ORDER = 3  # of REF_SOLVER: halving the steps multiplies the error by 2**ORDER


class ReferenceSolutions:
    """Reference solutions of ``model``'s PF-ODE for batches of x_T, cached in ``out_dir/reference_solutions``.

    Args:
        model: the sweep's :class:`solvers.DiffusionModel`.
        out_dir: the results folder (None: no disk cache).
        identity: what else makes a solution differ (model name and options, dtype, network setting, …).
        batch_size: rows per solver call.
        say: called with one line before a long solve.
    """

    def __init__(self, model: solvers.DiffusionModel, out_dir: Optional[Path], identity: dict, batch_size: int,
                 say: Callable[[str], None] = lambda text: None):
        self.model, self.out_dir, self.batch_size, self.say = model, out_dir, int(batch_size), say
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self._memory: dict = {}

    def solve(self, x_T: torch.Tensor, grid) -> tuple[np.ndarray, np.ndarray]:
        """(solution, estimated error) for ``x_T`` over the cell grid ``grid``, each flattened to (n, D): the
        REF_STEPS solution and (half-step solution − it) / (2**ORDER − 1), its error estimate per coordinate."""
        sched = self.model.schedule
        to_zero = float(sched.sigma(torch.tensor([float(grid[-1])], dtype=torch.float64))[0]) == 0.0
        t_from, t_last = float(grid[0]), float(grid[-1])
        if to_zero:  # the ODE's end point at σ = 0: solved down to the schedule's smallest usual level, then denoised
            t_last = min(float(grid[-2]), float(sched.default_t_end))
        key = self._key(x_T, t_from, t_last, to_zero)
        if key not in self._memory:
            self._memory[key] = self._cached(key) or self._compute(key, x_T, t_from, t_last, to_zero)
        return self._memory[key]

    def _key(self, x_T: torch.Tensor, t_from: float, t_last: float, to_zero: bool) -> str:
        h = hashlib.sha256()
        h.update(x_T.detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps([list(x_T.shape), str(x_T.dtype), repr(t_from), repr(t_last), to_zero, REF_SOLVER,
                             REF_STEPS, self.identity]).encode())
        return h.hexdigest()[:32]

    def _path(self, key: str) -> Optional[Path]:
        return None if self.out_dir is None else Path(self.out_dir) / CACHE_FOLDER / f"{key}.npz"

    def _cached(self, key: str):
        path = self._path(key)
        if path is None or not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            return z["solution"], z["error"]

    def _compute(self, key: str, x_T: torch.Tensor, t_from: float, t_last: float, to_zero: bool):
        n = x_T.shape[0]
        self.say(f"ref_error's reference: {REF_SOLVER} with {REF_STEPS} and {REF_STEPS // 2} log-SNR steps from "
                 f"t = {t_from:.4g} to {t_last:.4g}{' then to σ = 0' if to_zero else ''} for {n:,} start points "
                 f"({(REF_STEPS + REF_STEPS // 2) * n:,} model calls; cached in {self._path(key) or 'memory'})")
        fine = self._integrate(x_T, REF_STEPS, t_from, t_last, to_zero)
        coarse = self._integrate(x_T, REF_STEPS // 2, t_from, t_last, to_zero)
        out = fine, (coarse - fine) / (2 ** ORDER - 1)
        path = self._path(key)
        if path is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, solution=out[0], error=out[1])
            atomic_write_bytes(path, buf.getvalue())
        return out

    def _integrate(self, x_T: torch.Tensor, steps: int, t_from: float, t_last: float, to_zero: bool) -> np.ndarray:
        grid = solvers.make_grid(self.model.schedule, steps, spacing="logsnr", t_start=t_from, t_end=t_last,
                                 denoise_to_zero=to_zero)
        parts = []
        for b in range(0, x_T.shape[0], self.batch_size):
            res = solvers.sample(self.model, x_T[b:b + self.batch_size], solver=REF_SOLVER, timesteps=grid,
                                 timing=False)
            parts.append(res.samples.detach().to(torch.float64).reshape(res.samples.shape[0], -1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, int(np.prod(x_T.shape[1:]))))
