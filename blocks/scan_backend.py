"""`mixer.backend=auto` on CUDA: the Triton selective scan, unless mamba-ssm is installed and measured faster.

Which of the two is faster depends on the shape, on the memory layout of the inputs and on whether a
backward follows (benchmarks/RESULTS.md). So the first time a mixer meets a shape it times both scans on its
own inputs, in their layouts (fwd, or fwd+bwd when autograd is recording), and keeps the faster for the rest
of the process; timed on contiguous copies instead, mamba-ssm's scan looks faster than it is inside the
mixer, where it first copies its inputs. Nothing is timed while torch.compile traces (the kept choice, or
Triton, is used there). The conv stays on the Triton kernel either way.
"""
from __future__ import annotations

import functools
import statistics
import warnings
from collections.abc import Callable

import torch

# (B, L, E, N, dtype, strides of the inputs, with backward) -> "triton" | "mamba_ssm"
_choices: dict[tuple, str] = {}


@functools.cache
def mamba_ssm_scan() -> Callable | None:
    """mamba-ssm's selective_scan_fn when it imports, else None (it is the optional `.[cuda]` extra)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def cuda_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median milliseconds of fn on the current CUDA stream, after one warm-up call (which compiles)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def scan_case(args: tuple, kw: dict, backward: bool, scan: Callable) -> Callable[[], object]:
    """A call of `scan` on detached views of the mixer's own inputs: the same values, shapes and memory
    layouts (a kernel that needs contiguous inputs pays for its copies here as it would in the mixer)."""
    def view(t):  # every input the mixer's backward differentiates (u, delta, A, B, C, D, z, delta bias)
        return t.detach().requires_grad_(backward) if isinstance(t, torch.Tensor) else t

    args, kw = tuple(view(a) for a in args), {k: view(v) for k, v in kw.items()}
    ins = [t for t in (*args, *kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        y = scan(*args, **kw)
        if backward:
            torch.autograd.grad(y, ins, torch.ones_like(y))
        return y

    return run


def choose(args: tuple, kw: dict, backward: bool, triton_scan: Callable,
           timer: Callable[[Callable[[], object]], float] = cuda_time_ms) -> str:
    """"triton" or "mamba_ssm" for the scan of these inputs (u, delta, A, B, C as the mixer passes them; kw the
    D, z, delta_bias, delta_softplus keywords): the faster of the two as measured, once per shape and pass."""
    theirs = mamba_ssm_scan()
    if theirs is None:  # the common case: nothing to choose, nothing to compute on every forward
        return "triton"
    u, _, A = args[:3]
    shape = (u.shape[0], u.shape[2], u.shape[1], A.shape[1])  # B, L, E, N
    key = (*shape, u.dtype, tuple(a.stride() for a in args), backward)
    if key in _choices:
        return _choices[key]
    if torch.compiler.is_compiling():
        return "triton"
    with torch.enable_grad() if backward else torch.no_grad():
        times = {name: timer(scan_case(args, kw, backward, fn))
                 for name, fn in (("triton", triton_scan), ("mamba_ssm", theirs))}
    _choices[key] = min(times, key=times.get)
    if _choices[key] != "triton":
        pass_ = "fwd+bwd" if backward else "fwd"
        warnings.warn(f"mixer.backend=auto: mamba-ssm's scan measured faster for B, L, E, N = {shape} {pass_} "
                      f"({times['mamba_ssm']:.3f} against {times['triton']:.3f} ms); using it for that shape",
                      stacklevel=3)
    return _choices[key]
