"""Fast paths for the network call: autocast, channels-last, ``torch.compile`` and CUDA-graph capture.

    import solvers
    fast = solvers.accelerate(model, autocast="bf16", channels_last=True, compile=True, cuda_graph=False)
    res = solvers.sample(fast, x_T, solver="dpmpp_2m", steps=10)

A sampler's time is NFE × the network's time plus the solver's own work, and the solvers already keep their own
work off the device's critical path (coefficients once per grid, no host syncs).  What is left is the network
call itself; :func:`accelerate` returns a new :class:`~solvers.DiffusionModel` whose network call is wrapped by
:class:`FastNetwork`:

* ``autocast`` ("bf16" / "fp16"): the network runs under :func:`torch.autocast` on the input's device; its
  output is cast back to the dtype it was called with, so the solver state keeps its own precision
  (float32 / float64).  The quality cost is real and measurable (``python -m bench.perf quality``).
* ``channels_last``: 4-D inputs are passed in channels-last memory order, and a network that is an
  ``nn.Module`` is converted to channels-last **in place** (its parameters are re-laid out; values unchanged).
* ``compile``: :func:`torch.compile` of the network call (``True`` = the default mode, or a mode name such as
  ``"max-autotune-no-cudagraphs"``); shapes are static, so each new batch size (and input layout) compiles
  once — and Dynamo stops compiling a function after its recompile limit (8 by default, shared by every
  ``FastNetwork`` in the process), running it eagerly with a warning.  Modes that capture CUDA graphs
  themselves (``reduce-overhead``, ``max-autotune``) get their output cloned after each call.
* ``cuda_graph``: on a CUDA device, the network call for each (shape, dtype) is captured once into a
  :class:`torch.cuda.CUDAGraph` after three warm-up calls and replayed afterwards — the launch overhead of a
  network of hundreds of small kernels goes away.  The inputs are copied into the graph's static buffers and
  the output is cloned out of it (a multistep solver keeps earlier outputs), so results are those of the eager
  call.  The network must be a pure function of ``(x, t)`` (no data-dependent control flow, no host syncs or
  host↔device copies: a capture that fails says so).  All of a network's graphs share one memory pool; after
  ``MAX_GRAPHS`` distinct shapes, new ones run uncaptured (the adaptive solver's varying row counts).

None of these changes what the solvers compute besides the network's own rounding; NFE accounting is
unchanged (the wrapper sits under :meth:`DiffusionModel.raw`).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import torch

__all__ = ["accelerate", "FastNetwork", "AUTOCAST_DTYPES", "COMPILE_MODES", "MAX_GRAPHS", "compile_mode_uses_cudagraphs"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_WARMUP_CALLS = 3
MAX_GRAPHS = 8   # distinct input shapes captured per network; later new shapes run uncaptured (with a warning)


def compile_mode_uses_cudagraphs(mode) -> bool:
    """Whether a :func:`torch.compile` mode captures CUDA graphs itself (``reduce-overhead``, ``max-autotune``)."""
    if mode in (None, True, False, "default", "max-autotune-no-cudagraphs"):
        return False
    try:
        from torch._inductor import list_mode_options
        return bool(list_mode_options(mode).get("triton.cudagraphs", False))
    except Exception:  # noqa: BLE001 — private API; fall back to the documented behaviour
        return mode in ("reduce-overhead", "max-autotune")


class FastNetwork:
    """``fn(x, t)`` with optional autocast, channels-last input, ``torch.compile`` and CUDA-graph replay.

    See the module docstring; build it through :func:`accelerate` (which also validates the options).
    ``graphs`` counts the CUDA graphs captured so far (one per input shape and dtype, at most ``MAX_GRAPHS``).
    """

    def __init__(self, fn: Callable, autocast: Optional[str] = None, channels_last: bool = False,
                 compile: Union[bool, str] = False, cuda_graph: bool = False, compile_backend: str = "inductor"):
        self.fn = fn
        self.autocast = autocast
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.rows_per_sample = getattr(fn, "rows_per_sample", 1)
        call = self._eager
        mode = None if compile is True or compile == "default" else (compile or None)
        if compile:
            call = torch.compile(self._eager, mode=mode, backend=compile_backend, dynamic=False)
        self._call = call
        # A mode that replays its own CUDA graphs hands out outputs that its next call overwrites: each call
        # starts a new step and its output is cloned (multistep solvers keep earlier outputs).
        self._compiled_graphs = bool(compile) and compile_backend == "inductor" and compile_mode_uses_cudagraphs(mode)
        self._graphs: dict = {}
        self._pool = None
        self._warned_full = False

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def _eager(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return self.fn(x, t)
        with torch.autocast(device_type=x.device.type, dtype=AUTOCAST_DTYPES[self.autocast]):
            out = self.fn(x, t)
        return out.to(x.dtype)

    def _plain_call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self._compiled_graphs:
            return self._call(x, t)
        torch.compiler.cudagraph_mark_step_begin()
        return self._call(x, t).clone()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Outside the compiled function: its guards would otherwise see the state's strides alternate (the
        # solver state takes on the layout of the network's output).
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.cuda_graph:
            return self._plain_call(x, t)
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs inputs on a CUDA device; x is on {x.device}. "
                             "Use cuda_graph=False on the CPU.")
        key = (tuple(x.shape), x.dtype, x.stride(), tuple(t.shape), t.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= MAX_GRAPHS:
                if not self._warned_full:
                    import warnings
                    warnings.warn(f"FastNetwork: {MAX_GRAPHS} CUDA graphs captured already (one per input shape); "
                                  f"shape {tuple(x.shape)} and later new ones run without a graph. A solver that "
                                  "calls the network on a varying number of rows (adaptive) gains nothing from "
                                  "cuda_graph=True.", RuntimeWarning, stacklevel=2)
                    self._warned_full = True
                return self._plain_call(x, t)
            entry = self._graphs[key] = self._capture(x, t)
        graph, static_x, static_t, static_out = entry
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor):
        with torch.cuda.device(x.device):
            static_x, static_t = x.clone(), t.clone(memory_format=torch.contiguous_format)
            if self._pool is None:
                # One memory pool for all of this network's graphs: replays are sequential on one stream and
                # their outputs are cloned at once, so the graphs can share their activations' memory.
                self._pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(device=x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            try:
                with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
                    for _ in range(GRAPH_WARMUP_CALLS):
                        self._plain_call(static_x, static_t)
                torch.cuda.current_stream(x.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    static_out = self._plain_call(static_x, static_t)
            except RuntimeError as e:
                raise RuntimeError(
                    f"the network could not be captured into a CUDA graph for input shape {tuple(x.shape)} "
                    f"({type(e).__name__}: {e}). Capture needs a network without host↔device copies, host "
                    "synchronisation or data-dependent control flow; run it with cuda_graph=False "
                    "(bench.run: without --cuda-graph).") from e
        return graph, static_x, static_t, static_out


def accelerate(model, *, autocast: Optional[str] = None, channels_last: bool = False,
               compile: Union[bool, str] = False, cuda_graph: bool = False, compile_backend: str = "inductor"):
    """A copy of ``model`` (a :class:`~solvers.DiffusionModel`) whose network call takes the fast paths asked for.

    Args:
        model: the model to speed up; it is not changed, except that ``channels_last=True`` converts an
            ``nn.Module`` network to channels-last memory order in place.
        autocast: None, "bf16" or "fp16": run the network under :func:`torch.autocast` (output cast back).
        channels_last: pass 4-D inputs in channels-last order (and convert an ``nn.Module`` network).
        compile: False, True / "default", or a :func:`torch.compile` mode name.
        cuda_graph: capture the network call into CUDA graphs (CUDA inputs only; see the module docstring).
        compile_backend: the :func:`torch.compile` backend ("inductor"; "eager" to test the plumbing).

    Raises:
        ValueError: an unknown autocast dtype or compile mode.
    """
    from .model import DiffusionModel

    if not isinstance(model, DiffusionModel):
        raise TypeError(f"accelerate() takes a solvers.DiffusionModel, got {type(model).__name__}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None or one of {', '.join(AUTOCAST_DTYPES)}, got {autocast!r}")
    if not isinstance(compile, bool) and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True/False or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
                         f"got {compile!r}")
    if cuda_graph and compile_backend == "inductor" and compile_mode_uses_cudagraphs(compile):
        raise ValueError(f"compile={compile!r} already captures CUDA graphs; use it or cuda_graph=True, not both "
                         "(compile='max-autotune-no-cudagraphs' or 'default' combine with cuda_graph=True)")
    if channels_last and isinstance(model.fn, torch.nn.Module):
        model.fn.to(memory_format=torch.channels_last)
    fast = copy.copy(model)
    fast.fn = FastNetwork(model.fn, autocast=autocast, channels_last=channels_last, compile=compile,
                          cuda_graph=cuda_graph, compile_backend=compile_backend)
    return fast
