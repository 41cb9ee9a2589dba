"""The solver registry: a plain dict from name to solver class, plus aliases.

The built-in solvers are registered by :mod:`solvers.builtin` (imported by the package); this module imports
no solver, so a solver module may use the registry (predictor–corrector looks up its predictor here).
"""
from __future__ import annotations

import dataclasses
from typing import Type

from .base import Solver
from .grids import SPACINGS

SOLVERS: dict[str, Type[Solver]] = {}
ALIASES: dict[str, str] = {"em": "euler_maruyama", "dpmpp": "dpmpp_2m"}

__all__ = ["SOLVERS", "ALIASES", "register", "available_solvers", "get_solver", "solver_class"]


def register(cls: Type[Solver]) -> Type[Solver]:
    """Register a solver class under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise TypeError("only subclasses of solvers.base.Solver can be registered")
    if cls.name in SOLVERS or cls.name in ALIASES:
        raise ValueError(f"a solver named {cls.name!r} is already registered")
    spacings = [cls.default_spacing] + [s for s, _ in cls.paper_spacing_by_data.values()]
    if any(s not in SPACINGS for s in spacings):
        raise ValueError(f"solver {cls.name!r} declares the default spacing(s) {spacings}; "
                         f"valid: {', '.join(SPACINGS)}")
    SOLVERS[cls.name] = cls
    return cls


def available_solvers(*, aliases: bool = True) -> list[str]:
    """Names accepted by :func:`solvers.sample` (canonical names, then aliases if ``aliases``)."""
    return sorted(SOLVERS) + (sorted(ALIASES) if aliases else [])


def solver_class(name: str) -> Type[Solver]:
    """The class registered under ``name`` or one of its aliases.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if not isinstance(name, str):
        raise ValueError(f"solver must be a name (str), got {type(name).__name__}")
    canonical = ALIASES.get(name, name)
    try:
        return SOLVERS[canonical]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(available_solvers())}") from None


def get_solver(name: str, **options) -> Solver:
    """Build a configured solver.

    Raises:
        ValueError: unknown solver name.
        TypeError: an option the solver does not have (the message lists its options).
    """
    cls = solver_class(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"solver {cls.name!r} has no option(s) {', '.join(unknown)}; "
                        f"its options are: {', '.join(valid) if valid else '(none)'}")
    return cls(**options)
