"""The built-in solvers, registered under their names (importing :mod:`solvers` runs this once)."""
from __future__ import annotations

from .adaptive import Adaptive
from .consistency import Consistency
from .deis import DEIS, IPNDM
from .dpmpp import DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP2S, DPMSolverPP3M
from .first_order import DDIM, DDPM, Euler, EulerMaruyama
from .heun import Heun
from .langevin import Langevin, PredictorCorrector
from .registry import register
from .unipc import UniPC

BUILTIN = (Euler, EulerMaruyama, DDIM, DDPM, Heun, DPMSolverPP2M, DPMSolverPP3M, DPMSolverPP2S, DPMSolverPP2MSDE,
           Consistency, UniPC, DEIS, IPNDM, Langevin, PredictorCorrector, Adaptive)

for _cls in BUILTIN:
    register(_cls)
