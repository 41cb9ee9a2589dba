"""Argument checks shared by the public entry points: dtypes, states, shapes and real-valued options.

Each check raises before any expensive work, with a message that names the argument, what was given and
what would be accepted.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["FLOAT_DTYPES", "as_float_dtype", "check_float_tensor", "check_shape", "check_real"]

# The state of a solver is a real floating tensor: integer, bool or complex states would truncate (or drop the
# imaginary part of) every update silently.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float": torch.float32, "float64": torch.float64,
                "double": torch.float64}
_ACCEPTED = "torch.float16, torch.bfloat16, torch.float32 or torch.float64 (or its name, e.g. 'float64')"


def as_float_dtype(dtype: Union[torch.dtype, str], what: str = "dtype") -> torch.dtype:
    """``dtype`` as one of :data:`FLOAT_DTYPES`; a name (``"float64"``, ``"torch.float64"``, ``"double"``,
    ``"half"``, …) is accepted for the dtype it names.

    Raises:
        TypeError: not a dtype or a dtype name, or a dtype that is not real floating.
    """
    if isinstance(dtype, str):
        name = dtype[len("torch."):] if dtype.startswith("torch.") else dtype
        if name not in _DTYPE_NAMES:
            raise TypeError(f"{what}={dtype!r} is not the name of a real floating dtype; accepted: {_ACCEPTED}")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{what} must be a torch.dtype, got {type(dtype).__name__} {dtype!r}; accepted: {_ACCEPTED}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}={dtype} is not a real floating dtype (values would be truncated or lose their "
                        f"imaginary part); accepted: {_ACCEPTED}")
    return dtype


def check_float_tensor(x, what: str) -> torch.Tensor:
    """``x`` if it is a real floating tensor with a batch dimension of at least one sample and no empty dimension.

    Raises:
        ValueError: not a tensor, no batch dimension, a zero-size dimension.
        TypeError: an integer, bool or complex tensor.
    """
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        got = f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be a tensor with a batch dimension of at least one sample, got {got}")
    if x.numel() == 0:
        raise ValueError(f"{what} has a zero-size dimension (shape {tuple(x.shape)}); every dimension must be ≥ 1")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be a real floating tensor ({', '.join(str(d) for d in FLOAT_DTYPES)}), got "
                        f"{x.dtype}: its values would be truncated or lose their imaginary part. Convert it first "
                        f"(e.g. {what}.float()) or draw it with solvers.initial_noise")
    return x


def check_shape(shape: Sequence[int], what: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints (batch first).

    Raises:
        ValueError: not a sequence of integers, no batch dimension, or a dimension < 1.
    """
    if (torch.is_tensor(shape) or isinstance(shape, np.ndarray)) and shape.ndim == 1:
        shape = shape.tolist()
    if torch.is_tensor(shape) or isinstance(shape, (int, np.integer, np.ndarray, str, bytes)):
        raise ValueError(f"{what} must be a sequence of dimensions, batch first (e.g. (16, 3, 32, 32)), "
                         f"got {shape!r}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of dimensions, batch first, got {shape!r}") from None
    if len(dims) < 1:
        raise ValueError(f"{what} must include the batch dimension")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise ValueError(f"{what} must hold integers, got {d!r} in {dims}")
        if d < 1:
            raise ValueError(f"{what}={dims} has a dimension of {d}; every dimension (the batch included) "
                             "must be ≥ 1")
    return tuple(int(d) for d in dims)


def check_real(owner: str, name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> None:
    """Check a real-valued option: a number (not a bool), not NaN, finite unless ``allow_inf``, in the range.

    Args:
        owner, name: who owns the option and its name, for the message (``"heun"``, ``"s_churn"``).
        low, high: the bounds (``None``: unbounded); ``low_open``/``high_open`` exclude them.

    Raises:
        ValueError: the message names the option, the value given and the accepted range.
    """
    lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = ("inf]" if allow_inf else "inf)") if high is None else f"{high:g}{')' if high_open else ']'}"
    accepted = f"in {lo}, {hi}{'' if allow_inf else ' and finite'}"
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    ok = number
    if number:
        v = float(value)
        ok = not math.isnan(v) and (allow_inf or math.isfinite(v))
        ok = ok and (low is None or (v > low if low_open else v >= low))
        ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        kind = "" if number else f" ({type(value).__name__}, not a number)"
        raise ValueError(f"{owner}: {name} must be {accepted}, got {value!r}{kind}")
