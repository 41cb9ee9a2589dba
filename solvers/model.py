"""The one model contract: any network becomes a denoiser D(x, t) ≈ E[x0 | x_t] at the boundary.

A network ``fn(x, model_time)`` predicts one of

* ``"eps"``      — the noise ε                      x0 = (x − σ·ε)/α
* ``"score"``    — ∇ log p_t(x) = −ε/σ               x0 = (x + σ²·s)/α
* ``"x0"``       — the clean sample                  x0 = out
* ``"v"``        — v = α·ε − σ·x0 (VP schedules)     x0 = α·x − σ·v
* ``"velocity"`` — u = dx_t/dt = α'·x0 + σ'·ε        x0 = (σ'·x − σ·u)/(σ'·α − σ·α')

Each conversion is affine, x0 = a(t)·x + b(t)·out, with coefficients computed once per time on the host, so
no solver ever branches on the prediction type.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Literal, Optional, Tuple, Union

import torch

from .schedules import Schedule
from .validation import as_float_dtype

Prediction = Literal["eps", "score", "x0", "v", "velocity"]
PREDICTIONS = ("eps", "score", "x0", "v", "velocity")

__all__ = ["DiffusionModel", "classifier_free_guidance", "PREDICTIONS"]


# A multiple of every CPU vector width (2 × 8 float64 lanes under AVX-512, the unrolled body of ATen's loops).
_LANES = 64


def lanewise(fn: Callable[..., object], *vectors: torch.Tensor):
    """``fn(*vectors)`` on 1-D host tensors, computed so that each element's value depends on that element only.

    ATen's CPU kernels run a vectorised body over whole blocks of lanes and a scalar loop over the remainder,
    and transcendental functions (pow, softplus, …) round differently on the two paths: the same time gets
    a different α(t) in the last bit depending on where it sits in the batch.  Padding the vectors to a
    multiple of the block (with copies of their first element) sends every element through the body.
    Used for per-sample quantities, so that a sample's result never depends on its batch-mates.

    Returns:
        ``fn``'s result (a tensor or a tuple of tensors), cut back to the vectors' length.
    """
    n = vectors[0].numel()
    m = -(-n // _LANES) * _LANES
    if m != n:
        vectors = tuple(torch.cat([v, v[:1].expand(m - n)]) for v in vectors)
    out = fn(*vectors)
    if isinstance(out, tuple):
        return tuple(o[:n] for o in out)
    return out[:n]


def network_dtype(fn) -> Optional[torch.dtype]:
    """The dtype a network must be called in: that of its floating parameters and buffers when ``fn`` is a
    ``torch.nn.Module`` whose floating tensors all share one dtype; ``None`` (unknown) otherwise — a plain
    function, a module without floating tensors or with several floating dtypes (mixed precision)."""
    if not isinstance(fn, torch.nn.Module):
        return None
    dtypes = {p.dtype for p in (*fn.parameters(), *fn.buffers()) if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


class DiffusionModel:
    """A network with its schedule and parameterisation, seen by the solvers as a denoiser.

    Args:
        fn: ``fn(x, t) -> tensor`` of the same shape as x; ``t`` is a tensor of shape (batch,) holding the
            network's own time input (``schedule.model_time`` of the solver time).  ``fn`` must not modify
            ``x`` or ``t`` in place (the loop reuses them).
        schedule: the :class:`~solvers.schedules.Schedule` the network was trained with.
        prediction: what ``fn`` predicts (see the module docstring).
        clip_x0: optional ``(low, high)``: clamp the predicted x0 to this range (DDPM's ``clip_sample``).
        dynamic_threshold: optional percentile p in (0, 1): Imagen's dynamic thresholding — per sample,
            s = max(1, quantile(|x0|, p)), then x0 ← clamp(x0, −s, s)/s·``clip_x0`` bound (1 by default).
        input_dtype: dtype the network is called in (its input x and time t; the output is cast back to the
            state's dtype, so the solver state may be float64 for a float32 network, as in EDM).  ``None``:
            the dtype of ``fn``'s floating parameters and buffers when ``fn`` is a ``torch.nn.Module`` whose
            floating tensors all have one dtype (:func:`network_dtype`), else the state's dtype.
        rows_per_sample: network batch rows per sample in one call (2 under classifier-free guidance);
            taken from ``fn.rows_per_sample`` when present.

    Raises:
        ValueError: unknown prediction, or one the schedule cannot support (``"v"`` needs α² + σ² = 1); a
            ``rows_per_sample`` (argument or ``fn`` attribute) that is not a positive integer.
        TypeError: an ``input_dtype`` that is not real floating.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, schedule: Schedule,
                 prediction: Prediction = "eps", clip_x0: Optional[Tuple[float, float]] = None,
                 dynamic_threshold: Optional[float] = None, input_dtype: Optional[torch.dtype] = None,
                 rows_per_sample: Optional[int] = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(x, t), got {type(fn).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a solvers.schedules.Schedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if prediction == "v" and not schedule.variance_preserving:
            raise ValueError(f"prediction 'v' (v = α·ε − σ·x0) is defined on variance-preserving schedules "
                             f"only; {type(schedule).__name__} is not one. Use 'eps', 'x0', 'score' or "
                             f"'velocity'.")
        if clip_x0 is not None:
            lo, hi = clip_x0
            if not lo < hi:
                raise ValueError(f"clip_x0 must be (low, high) with low < high, got {clip_x0}")
        if dynamic_threshold is not None and not 0 < dynamic_threshold < 1:
            raise ValueError(f"dynamic_threshold is a percentile in (0, 1), got {dynamic_threshold}")
        self.fn = fn
        self.schedule = schedule
        self.prediction = prediction
        self.clip_x0 = None if clip_x0 is None else (float(clip_x0[0]), float(clip_x0[1]))
        self.dynamic_threshold = dynamic_threshold
        self.input_dtype = network_dtype(fn) if input_dtype is None else as_float_dtype(input_dtype, "input_dtype")
        rows = getattr(fn, "rows_per_sample", 1) if rows_per_sample is None else rows_per_sample
        if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
            raise ValueError(f"rows_per_sample must be a positive integer (network batch rows per sample in one "
                             f"call: 1, or 2 under classifier-free guidance), got {rows!r}")
        self.rows_per_sample = int(rows)

    def conversion(self, t: float) -> tuple[float, float]:
        """Coefficients (a, b) with x0 = a·x + b·fn(x, t) at solver time t (host floats).

        Raises:
            ValueError: the conversion is singular at t (e.g. ε-prediction where α = 0).
        """
        a, b = self.conversion_at(torch.tensor([float(t)], dtype=torch.float64))
        return float(a[0]), float(b[0])

    def time_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the network's inputs for a state ``x``: ``input_dtype``, else the state's."""
        return x.dtype if self.input_dtype is None else self.input_dtype

    def raw(self, x: torch.Tensor, model_time: Union[float, torch.Tensor]) -> torch.Tensor:
        """One network call at a host-side model time (or a (batch,) tensor of them, one per sample); casts to
        ``input_dtype`` and back."""
        t_dtype = self.time_dtype(x)
        if torch.is_tensor(model_time):
            t = model_time.reshape(-1).to(device=x.device, dtype=t_dtype)
        else:
            t = torch.full((x.shape[0],), model_time, dtype=t_dtype, device=x.device)
        xin = x if self.input_dtype is None else x.to(self.input_dtype)
        out = self.fn(xin, t)
        if not torch.is_tensor(out):
            kind = type(out)
            where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
            got = "None" if out is None else f"a {where}{kind.__qualname__}"
            raise TypeError(f"the model must return a torch.Tensor of the input's shape {tuple(x.shape)}; "
                            f"it returned {got}")
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                             "it must return a tensor of the input's shape")
        if out.is_complex():
            raise TypeError(f"the model returned a complex tensor ({out.dtype}); it must return a real tensor "
                            "(casting would drop the imaginary part)")
        return out.to(x.dtype)

    def denoise(self, x: torch.Tensor, t: float, *, coeffs: Optional[tuple[float, float]] = None,
                model_time: Optional[float] = None) -> torch.Tensor:
        """D(x, t): the predicted clean sample at solver time t (one network call).

        ``coeffs`` and ``model_time`` may be passed precomputed (the sampling loop does, once per grid).
        """
        a, b = coeffs if coeffs is not None else self.conversion(t)
        mt = model_time if model_time is not None else float(self.schedule.model_time(t))
        out = self.raw(x, mt)
        # One new tensor per call (out·b), updated in place: fewer batch-sized temporaries to allocate and
        # pass over (bench/studies/perf.py overhead).
        x0 = out if a == 0.0 and b == 1.0 else (out * b).add_(x, alpha=a) if a != 0.0 else out * b
        return self.threshold(x0)

    def denoise_combine(self, x: torch.Tensor, t: float, c_x: float, c_d: float, *,
                        coeffs: Optional[tuple[float, float]] = None,
                        model_time: Optional[float] = None) -> torch.Tensor:
        """c_x·x + c_d·D(x, t) as one new tensor (one network call): the whole update of a first-order step.

        Without clipping or thresholding, D = a·x + b·out is affine in the network output, so the update is
        (c_x + c_d·a)·x + (c_d·b)·out: two passes over the batch instead of four.  Otherwise (or when a
        subclass changes :meth:`denoise`) D is formed first.
        """
        plain = (self.clip_x0 is None and self.dynamic_threshold is None
                 and type(self).denoise is DiffusionModel.denoise and type(self).threshold is DiffusionModel.threshold)
        if not plain:
            return (x * c_x).add_(self.denoise(x, t, coeffs=coeffs, model_time=model_time), alpha=c_d)
        a, b = coeffs if coeffs is not None else self.conversion(t)
        mt = model_time if model_time is not None else float(self.schedule.model_time(t))
        return (self.raw(x, mt) * (c_d * b)).add_(x, alpha=c_x + c_d * a)

    def conversion_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample :meth:`conversion`: float64 tensors (a, b) for a (batch,) tensor of solver times.

        Raises:
            ValueError: the conversion is singular at one of the times.
        """
        s = self.schedule
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        p = self.prediction
        if p == "x0":
            return torch.zeros_like(t), torch.ones_like(t)
        alpha, sigma = torch.broadcast_to(s.alpha(t), t.shape), torch.broadcast_to(s.sigma(t), t.shape)
        if p == "v":
            return alpha, -sigma
        if p == "velocity":
            den = s.d_sigma(t) * alpha - sigma * s.d_alpha(t)
            if bool((den == 0).any()):
                bad = t[den == 0].tolist()
                raise ValueError(f"prediction 'velocity' cannot be converted to x0 at t={bad[0] if len(bad) == 1 else bad} "
                                 f"({type(s).__name__}: σ'α − σα' = 0)")
            return s.d_sigma(t) / den, -sigma / den
        if bool((alpha == 0).any()):
            bad = t[alpha == 0].tolist()
            where = bad[0] if len(bad) == 1 else bad
            raise ValueError(f"prediction {p!r} cannot be converted to x0 at t={where}: α(t) = 0 on "
                             f"{type(s).__name__}. Start the grid below t={min(bad)} or use a velocity/x0 model.")
        if p == "eps":
            return 1.0 / alpha, -sigma / alpha
        return 1.0 / alpha, sigma * sigma / alpha  # score

    def denoise_at(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D(x, t) with one solver time per sample: ``t`` is a (batch,) tensor (one network call).

        For solvers whose samples are at different times (adaptive step sizes chosen per sample).
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        if t.numel() != x.shape[0]:
            raise ValueError(f"denoise_at needs one time per sample: got {t.numel()} times for {x.shape[0]} rows")
        # Each sample's coefficients must not depend on its position in the batch (see lanewise).
        a, b, model_time = lanewise(lambda tt: (*self.conversion_at(tt), self.schedule.model_time(tt)), t)
        out = self.raw(x, model_time)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = a.to(device=x.device, dtype=x.dtype).reshape(shape)
        b = b.to(device=x.device, dtype=x.dtype).reshape(shape)
        return self.threshold(a * x + b * out)

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Apply the optional static clipping / dynamic thresholding to a predicted x0."""
        if self.dynamic_threshold is not None:
            bound = 1.0 if self.clip_x0 is None else max(abs(self.clip_x0[0]), abs(self.clip_x0[1]))
            flat = x0.reshape(x0.shape[0], -1).abs()
            # torch.quantile takes float32/float64 only: keep a float64 state's precision.
            flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            s = torch.quantile(flat, self.dynamic_threshold, dim=1).to(x0.dtype)
            s = torch.clamp(s, min=1.0).view(-1, *([1] * (x0.dim() - 1)))
            return torch.maximum(torch.minimum(x0, s), -s) / s * bound
        if self.clip_x0 is not None:
            return x0.clamp(self.clip_x0[0], self.clip_x0[1])
        return x0

    def __repr__(self):
        return (f"DiffusionModel(prediction={self.prediction!r}, schedule={self.schedule!r}, "
                f"clip_x0={self.clip_x0}, dynamic_threshold={self.dynamic_threshold})")


def classifier_free_guidance(fn: Callable[..., torch.Tensor], cond, uncond, scale: float
                             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap a conditional network ``fn(x, t, c)`` for classifier-free guidance.

    One batched call evaluates the conditional and the unconditional branch ([x; x], [c; ∅]) and returns
    out_u + scale·(out_c − out_u).  The combination is affine, so it is the same in any parameterisation.
    The wrapper declares ``rows_per_sample = 2`` so that the sampling loop counts the network's batch rows.

    Args:
        fn: ``fn(x, t, c)``; ``cond`` and ``uncond`` are tensors with one row per sample.
        scale: guidance scale w, a finite real number (1 = conditional model alone, 0 = unconditional).

    Raises:
        TypeError: an ``fn`` that is not callable.
        ValueError: a scale that is not a finite real number; cond and uncond of different shapes.
    """
    if not callable(fn):
        raise TypeError("fn must be callable as fn(x, t, c)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"classifier_free_guidance: scale must be a finite real number (the guidance weight w: "
                         f"1 = the conditional model alone, 0 = the unconditional one), got {scale!r}")
    scale = float(scale)
    if torch.is_tensor(cond) and torch.is_tensor(uncond) and cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and "
                         f"{tuple(uncond.shape)}")

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if cond.shape[0] != n:
            raise ValueError(f"classifier-free guidance: cond has {cond.shape[0]} rows for a batch of {n}")
        out = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
        out_c, out_u = out[:n], out[n:]
        return out_u + scale * (out_c - out_u)

    guided.rows_per_sample = 2
    return guided
