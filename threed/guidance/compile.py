"""torch.compile for the frozen networks of a guidance: the launch overhead out of the SDS step.

Eager, Stable Diffusion's UNet at classifier-free-guidance batch 2 is launch-bound: its ~1.6 TFLOP take
2-4 ms of an H100's arithmetic but 33 ms as some thousand small kernels. Inductor fuses the elementwise
work around the convolutions and matrix products; CUDA graphs (`reduce-overhead`) then replay the whole
network as one launch. The VAE encoder is differentiated (SDS backpropagates through it into the render),
so by default it is compiled without CUDA graphs: a graph's outputs and saved activations live in a pool
that its next replay overwrites, which a function whose backward runs later must not risk for a few
hundred microseconds of launches.

A network is compiled at its first call, with static shapes (the render size, the CFG batch of 2 and the
text-embedding shape are fixed for a run). That call is timed, and the result is cached on disk between
runs: inductor's FX graph and AOT autograd caches under threed's cache folder. Where compiling fails (no
Triton, no C++ compiler on a CPU, an operator it cannot handle), the network runs eagerly after a one-line
warning: compiling is an optimisation, never a reason for a run to stop.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from threed.errors import first_line
from threed.io import cache_root

MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor modes that capture CUDA graphs
# torch.compile's compiler; tests set "aot_eager" to run the same plumbing (dynamo + AOT autograd) on a CPU
# in seconds, without generating kernels.
BACKEND = "inductor"


def resolve_mode(mode: str, device: torch.device | str, on_cuda: str) -> str:
    """The mode a network is compiled with: `auto` is `on_cuda` on a CUDA device and `none` elsewhere
    (inductor's CPU kernels need a C++ compiler and win little for these networks)."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return on_cuda if torch.device(device).type == "cuda" else "none"
    return mode


def uses_cudagraphs(mode: str) -> bool:
    return BACKEND == "inductor" and mode in CUDAGRAPH_MODES


def setup_cache() -> Path:
    """Keep compiled graphs and kernels between runs: inductor's FX graph cache and AOT autograd cache
    under `$THREED_CACHE/inductor` (unless TORCHINDUCTOR_CACHE_DIR is set). A second run with the same
    networks and shapes then skips code generation; dynamo still traces (seconds)."""
    # Inductor writes its default (/tmp/torchinductor_<user>) into the environment the first time it asks
    # for its cache folder, so "already set" can mean inductor's default rather than the user's choice:
    # only a value other than that default is the user's.
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        inductor_default = default_cache_dir()
    except (ImportError, AttributeError):  # another torch layout: keep any value already there
        inductor_default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", inductor_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    # Both flags are read from the environment when their config modules are imported: set them directly
    # too, in case an earlier compile in this process imported them first.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1":
        inductor_config.fx_graph_cache = True
    if os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1":
        functorch_config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def new_iteration() -> None:
    """Tell CUDA graph trees that a training step begins: the outputs of the previous step's replays may be
    overwritten from now on. Called once per guidance call, before its first compiled network, so that a
    differentiated network's forward and backward stay in one step."""
    torch.compiler.cudagraph_mark_step_begin()


def warn(message: str) -> None:
    """One line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"threed: warning: {message}", file=sys.stderr)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


class CompiledFunction:
    """`fn` compiled with torch.compile at its first call, or `fn` itself.

    The first `trial_calls` calls run inside a guard: an exception there (a failed compile, or the CUDA
    graph recording at the second call) switches to eager for good, with one warning. The first call is
    timed (compile + one run, synchronised): `seconds`. With `differentiable`, that first call also runs a
    backward on a detached copy of the inputs, so that the backward graph, which AOT autograd would
    otherwise compile at the training loop's first `backward()`, outside this guard, is compiled, timed
    and checked here too. Under CUDA graphs the outputs are cloned: the next replay overwrites the
    graph's own.
    """

    def __init__(self, fn: Callable[..., Any], mode: str, name: str, differentiable: bool = False,
                 trial_calls: int = 2) -> None:
        if mode not in MODES or mode in ("auto", "none"):
            raise ValueError(f"CompiledFunction needs a compile mode, not {mode!r}")
        self.fn, self.mode, self.name = fn, mode, name
        self.differentiable = differentiable
        self.trial_calls = max(trial_calls, 1)
        self.cudagraphs = uses_cudagraphs(mode)
        self.compiled: Callable[..., Any] | None = None
        self.seconds: float | None = None  # compile time, measured at the first call
        self.error: str | None = None  # why it runs eagerly, if it does
        self.calls = 0

    def __repr__(self) -> str:
        state = "eager: " + self.error if self.error else ("compiled" if self.compiled else "not yet compiled")
        return f"CompiledFunction({self.name}, mode={self.mode}, {state})"

    @property
    def active(self) -> bool:
        """Compiled and not fallen back to eager."""
        return self.error is None

    def _compile(self) -> Callable[..., Any]:
        if BACKEND == "inductor":
            setup_cache()
            return torch.compile(self.fn, mode=self.mode, dynamic=False)
        return torch.compile(self.fn, backend=BACKEND, dynamic=False)

    def _run(self, *args: Any) -> Any:
        assert self.compiled is not None
        out = self.compiled(*args)
        return _clone(out) if self.cudagraphs else out

    def _trial_backward(self, args: tuple) -> None:
        inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args]
        wrt = [a for a in inputs if isinstance(a, Tensor) and a.requires_grad]
        out = self._run(*inputs)
        if wrt and isinstance(out, Tensor) and out.requires_grad:
            torch.autograd.grad(out, wrt, torch.ones_like(out))
        if self.cudagraphs:
            new_iteration()  # the trial's outputs are dead: let the real call reuse the pool

    def __call__(self, *args: Any) -> Any:
        if self.error is not None:
            return self.fn(*args)
        if self.calls >= self.trial_calls:
            return self._run(*args)
        self.calls += 1
        try:
            if self.calls == 1:
                start = time.perf_counter()
                self.compiled = self._compile()
                if self.differentiable and torch.is_grad_enabled():
                    self._trial_backward(args)
                out = self._run(*args)
                _synchronize(out)
                self.seconds = time.perf_counter() - start
                return out
            return self._run(*args)
        except Exception as e:  # any failure to compile or record: the eager network computes the same
            self.error = _describe(e)
            self.compiled = None
            warn(f"compiling the {self.name} (mode {self.mode}) failed ({self.error[:300]}); it runs eagerly")
            return self.fn(*args)


def _describe(error: BaseException) -> str:
    """The innermost cause's type and first line: dynamo wraps a compiler's error in its own."""
    seen = {id(error)}
    while True:
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None or id(inner) in seen:
            return f"{type(error).__name__}: {first_line(error)}"
        seen.add(id(inner))
        error = inner


def _synchronize(out: Any) -> None:
    """Wait for the GPU, so that the first call's time includes its kernels."""
    if isinstance(out, Tensor):
        out = [out]
    if isinstance(out, (tuple, list)) and any(isinstance(t, Tensor) and t.is_cuda for t in out):
        torch.cuda.synchronize()


def maybe_compile(fn: Callable[..., Any], mode: str, name: str, differentiable: bool = False) -> Callable[..., Any]:
    """`fn` itself for mode `none`, else a CompiledFunction (`mode` already resolved, see resolve_mode)."""
    if mode == "none":
        return fn
    return CompiledFunction(fn, mode, name, differentiable=differentiable)


def report(parts: list[Callable[..., Any]]) -> str | None:
    """One line on what was compiled and how long it took, once every part has made its first call; None
    when nothing is compiled."""
    compiled = [p for p in parts if isinstance(p, CompiledFunction) and p.active and p.seconds is not None]
    if not compiled:
        return None
    total = sum(p.seconds or 0.0 for p in compiled)
    each = ", ".join(f"{p.name} {p.mode} {p.seconds:.1f} s" for p in compiled)
    where = f"; cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}" if BACKEND == "inductor" else ""
    return f"compiled the guidance in {total:.1f} s ({each}{where})"
