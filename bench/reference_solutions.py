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
model and the run settings — and, for a class-conditional model, the guidance scale and the labels, whose guided
ODE it solves — so a resumed or extended sweep reuses them.  Each file holds what it is for and a digest of its
arrays, checked before it is used: a file that fails the check (edited, cut short, of another model) is named and
solved again.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
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
        condition: for a class-conditional model, ``condition(model, labels, guidance) -> DiffusionModel`` (the
            card's): a solve with labels integrates the guided ODE, conditioned batch by batch.
    """

    def __init__(self, model: solvers.DiffusionModel, out_dir: Optional[Path], identity: dict, batch_size: int,
                 say: Callable[[str], None] = lambda text: None, condition: Optional[Callable] = None):
        self.model, self.out_dir, self.batch_size, self.say = model, out_dir, int(batch_size), say
        self.condition = condition
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self._memory: dict = {}

    def solve(self, x_T: torch.Tensor, grid, labels: Optional[torch.Tensor] = None,
              guidance: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """(solution, estimated error) for ``x_T`` over the cell grid ``grid``, each flattened to (n, D): the
        REF_STEPS solution and (half-step solution − it) / (2**ORDER − 1), its error estimate per coordinate.
        With ``guidance``: of the ODE guided at that scale towards ``labels`` (one per row of x_T).

        Raises:
            ValueError: guidance without labels (one per row) or without a ``condition``.
        """
        if guidance is not None and (self.condition is None or labels is None or len(labels) != len(x_T)):
            raise ValueError(f"a guided reference solution needs the model's condition and one label per start "
                             f"point ({len(x_T)}); got condition={self.condition!r}, "
                             f"labels={None if labels is None else len(labels)}")
        cond = None if guidance is None else (labels.detach().cpu().to(torch.int64), float(guidance))
        sched = self.model.schedule
        to_zero = float(sched.sigma(torch.tensor([float(grid[-1])], dtype=torch.float64))[0]) == 0.0
        t_from, t_last = float(grid[0]), float(grid[-1])
        if to_zero:  # the ODE's end point at σ = 0: solved down to the schedule's smallest usual level, then denoised
            t_last = min(float(grid[-2]), float(sched.default_t_end))
        key = self._key(x_T, t_from, t_last, to_zero, cond)
        if key not in self._memory:
            self._memory[key] = self._cached(key, x_T) or self._compute(key, x_T, t_from, t_last, to_zero, cond)
        return self._memory[key]

    def _key(self, x_T: torch.Tensor, t_from: float, t_last: float, to_zero: bool, cond=None) -> str:
        h = hashlib.sha256()
        h.update(x_T.detach().cpu().contiguous().numpy().tobytes())
        if cond is not None:  # the guided ODE: its labels and scale (an unconditional key is as it always was)
            h.update(cond[0].numpy().tobytes())
            h.update(f"guidance={cond[1]!r}".encode())
        h.update(json.dumps([list(x_T.shape), str(x_T.dtype), repr(t_from), repr(t_last), to_zero, REF_SOLVER,
                             REF_STEPS, self.identity]).encode())
        return h.hexdigest()[:32]

    def _path(self, key: str) -> Optional[Path]:
        return None if self.out_dir is None else Path(self.out_dir) / CACHE_FOLDER / f"{key}.npz"

    def _cached(self, key: str, x_T: torch.Tensor):
        """The checked cached solution for ``x_T`` (None where there is none, or it fails its check: one line
        says why, and it is solved again)."""
        path = self._path(key)
        if path is None or not path.exists():
            return None
        shape = (x_T.shape[0], int(np.prod(x_T.shape[1:])))
        try:
            with np.load(path, allow_pickle=False) as z:
                solution, error, check = z["solution"], z["error"], json.loads(str(z["check"]))
            problem = _solution_problem(solution, error, check, key, shape)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            problem = f"unreadable: {type(e).__name__}: {e}"
        if problem is None:
            return solution, error
        self.say(f"the cached reference solution {path} fails its check ({problem}); solving it again")
        return None

    def _compute(self, key: str, x_T: torch.Tensor, t_from: float, t_last: float, to_zero: bool, cond=None):
        n = x_T.shape[0]
        self.say(f"ref_error's reference: {REF_SOLVER} with {REF_STEPS} and {REF_STEPS // 2} log-SNR steps from "
                 f"t = {t_from:.4g} to {t_last:.4g}{' then to σ = 0' if to_zero else ''} for {n:,} start points "
                 f"({(REF_STEPS + REF_STEPS // 2) * n:,} model calls; cached in {self._path(key) or 'memory'})")
        fine = self._integrate(x_T, REF_STEPS, t_from, t_last, to_zero, cond)
        coarse = self._integrate(x_T, REF_STEPS // 2, t_from, t_last, to_zero, cond)
        out = fine, (coarse - fine) / (2 ** ORDER - 1)
        path = self._path(key)
        if path is not None:  # with what it is for and a digest of its content, checked when it is read back
            check = {"key": key, "shape": list(out[0].shape), "sha256": _arrays_digest(*out)}
            buf = io.BytesIO()
            np.savez_compressed(buf, solution=out[0], error=out[1], check=np.array(json.dumps(check)))
            atomic_write_bytes(path, buf.getvalue())
        return out

    def _integrate(self, x_T: torch.Tensor, steps: int, t_from: float, t_last: float, to_zero: bool,
                   cond=None) -> np.ndarray:
        grid = solvers.make_grid(self.model.schedule, steps, spacing="logsnr", t_start=t_from, t_end=t_last,
                                 denoise_to_zero=to_zero)
        parts = []
        for b in range(0, x_T.shape[0], self.batch_size):
            model = self.model if cond is None else \
                self.condition(self.model, cond[0][b:b + self.batch_size].to(x_T.device), cond[1])
            res = solvers.sample(model, x_T[b:b + self.batch_size], solver=REF_SOLVER, timesteps=grid, timing=False)
            parts.append(res.samples.detach().to(torch.float64).reshape(res.samples.shape[0], -1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, int(np.prod(x_T.shape[1:]))))


def _arrays_digest(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str} {a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _solution_problem(solution: np.ndarray, error: np.ndarray, check: dict, key: str,
                      shape: tuple) -> Optional[str]:
    """Why a cached solution cannot be used for start points of flattened ``shape`` (None where it can)."""
    if not isinstance(check, dict) or check.get("key") != key:
        return "it was made for other start points, model or settings"
    if solution.shape != shape or error.shape != shape:
        return f"its arrays are {solution.shape} and {error.shape}, not one row per start point {shape}"
    if check.get("sha256") != _arrays_digest(solution, error):
        return "its content does not match its digest: edited or damaged"
    return None
