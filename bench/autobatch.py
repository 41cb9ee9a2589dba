"""``--batch-size auto``: the batch a sweep should use on this device.

* **CUDA** — the largest batch that fits.  One network call's peak memory (``torch.cuda.max_memory_allocated``)
  is measured at two batch sizes n and 2n, n grown ×4 until the peak passes ``PROBE_BYTES`` (below that the
  allocator's rounding hides the slope); that gives the memory per sample and the fixed part.  The solver
  state (``STATE_COPIES`` copies of x) is added, and the batch is the largest that keeps the total under
  ``memory_fraction`` of what the device has free (free memory plus this process's unused cache), evened out so
  that the samples split into batches of one size.  That batch is then tried; on an out-of-memory error it is
  halved until one call fits.
* **CPU** — memory is rarely the limit there but throughput saturates: the batch is doubled from 1 (one
  network call timed at each, best of ``CPU_REPEATS``) until two doublings in a row fail to beat the best
  samples/s by ``CPU_GAIN``, or a call takes over ``cpu_call_budget_s``; the fastest batch is kept.

Either way the batch is at most ``cap`` (the samples one process makes).  The batch size does not change the
samples (per-sample seeds), only the time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["AutoBatch", "auto_batch_size", "parse_batch_size", "STATE_COPIES", "CPU_GAIN"]

STATE_COPIES = 12         # x and what the widest solver keeps besides: dopri5's 7 stages, error, temporaries
CPU_GAIN = 1.10           # on the CPU, doubling stops after two doublings that raise samples/s by < 10 %
CPU_REPEATS = 3
PROBE_BYTES = 256 * 2**20  # CUDA: probe where one call's activations take at least this much


@dataclass
class AutoBatch:
    """The chosen batch size and how it was found (written next to the results)."""

    batch_size: int
    note: str


def parse_batch_size(text) -> "int | str":
    """``"auto"`` or a positive integer.

    Raises:
        ValueError: anything else.
    """
    if isinstance(text, int) or str(text).strip().isdigit():
        value = int(text)
        if value < 1:
            raise ValueError(f"--batch-size must be a positive integer or 'auto', got {value}")
        return value
    if str(text).strip().lower() == "auto":
        return "auto"
    raise ValueError(f"--batch-size must be a positive integer or 'auto', got {text!r}")


def _one_call(model, shape, n: int, device, dtype) -> None:
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    t = float(model.schedule.t_max) * 0.5
    with torch.no_grad():
        model.raw(x, float(model.schedule.model_time(torch.tensor([t], dtype=torch.float64))[0]))


def auto_batch_size(model, shape, device, dtype: torch.dtype = torch.float32, cap: int = 1 << 16, *,
                    memory_fraction: float = 0.85, cpu_call_budget_s: float = 2.0) -> AutoBatch:
    """The batch size to sample ``model`` with on ``device`` (see the module docstring).

    Args:
        model: a :class:`solvers.DiffusionModel` (probe it without CUDA graphs or compilation: those would
            capture or compile every probed shape).
        shape: the shape of one sample.
        cap: the largest batch worth having (the samples this process makes).

    Raises:
        ValueError: ``cap`` < 1 or a fraction outside (0, 1].
    """
    if cap < 1:
        raise ValueError(f"cap must be positive, got {cap}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda(model, shape, dev, dtype, cap, memory_fraction)
    return _cpu(model, shape, dev, dtype, cap, cpu_call_budget_s)


def _even(total: int, most: int) -> int:
    """The batch that splits ``total`` samples into as few batches of at most ``most`` as possible, all of
    (nearly) one size: no short last batch, which would cost its own kernel selection, compilation or graph."""
    batches = -(-total // most)
    return -(-total // batches)


def _peak(model, shape, n, dev, dtype) -> int:
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    _one_call(model, shape, n, dev, dtype)
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def _cuda(model, shape, dev, dtype, cap, fraction) -> AutoBatch:
    numel = 1
    for s in shape:
        numel *= int(s)
    # Probe at batches large enough for the activations to dominate the allocator's rounding (blocks of 2 MiB):
    # grow ×4 from 4 until one call's peak passes PROBE_BYTES, then measure at n1 and 2·n1.
    n1 = min(cap, 4)
    _one_call(model, shape, n1, dev, dtype)  # kernels chosen, workspaces allocated
    p1 = _peak(model, shape, n1, dev, dtype)
    while p1 < PROBE_BYTES and 4 * n1 <= cap:
        n1 *= 4
        p1 = _peak(model, shape, n1, dev, dtype)
    n2 = min(cap, 2 * n1)
    if n2 == n1:
        return AutoBatch(n1, f"auto: {n1} (= the samples per process, which fit: {p1 / 2**20:.0f} MiB at "
                             f"the peak)")
    p2 = _peak(model, shape, n2, dev, dtype)
    per_sample = max((p2 - p1) / (n2 - n1), 1.0) + STATE_COPIES * numel * torch.empty((), dtype=dtype).element_size()
    fixed = max(p1 - (p2 - p1) / (n2 - n1) * n1, 0.0)
    free, _ = torch.cuda.mem_get_info(dev)
    available = free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    n = int((fraction * available - fixed) // per_sample)
    n = max(1, min(cap, n))
    n = _even(cap, n)
    tried = []
    while True:
        try:
            _one_call(model, shape, n, dev, dtype)
            break
        except torch.cuda.OutOfMemoryError:
            tried.append(n)
            torch.cuda.empty_cache()
            if n == 1:
                raise
            n = _even(cap, max(1, n // 2))
    torch.cuda.empty_cache()
    note = (f"auto: {n} on {torch.cuda.get_device_name(dev)} ({per_sample / 2**20:.1f} MiB per sample, "
            f"{fixed / 2**20:.0f} MiB fixed, {available / 2**30:.1f} GiB available × {fraction}"
            + (f"; {', '.join(map(str, tried))} ran out of memory" if tried else "")
            + (f"; capped at {cap} samples per process" if n == cap else "") + ")")
    return AutoBatch(n, note)


def _cpu(model, shape, dev, dtype, cap, budget) -> AutoBatch:
    best_n, best_rate, trail, misses = 1, 0.0, [], 0
    n = 1
    while True:
        _one_call(model, shape, n, dev, dtype)  # first call of a shape: primitive set-up, not timed
        times = []
        for _ in range(CPU_REPEATS):
            t0 = time.perf_counter()
            _one_call(model, shape, n, dev, dtype)
            times.append(time.perf_counter() - t0)
            if times[-1] > budget / CPU_REPEATS:
                break
        dt = min(times)
        rate = n / max(dt, 1e-9)
        trail.append(f"{n}: {rate:.0f}/s")
        misses = 0 if rate >= CPU_GAIN * best_rate else misses + 1
        if rate > best_rate:
            best_n, best_rate = n, rate
        if misses >= 2 or dt > budget or n >= cap:
            break
        n = min(cap, 2 * n)
    return AutoBatch(best_n, f"auto: {best_n} on cpu (one network call, best of {CPU_REPEATS}, samples/s by batch — "
                             f"{', '.join(trail)})")
