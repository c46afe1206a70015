"""`mixer.backend=auto` on CUDA: the Triton selective scan, unless mamba-ssm is installed and measured faster.

Which of the two is faster depends on the shape and on whether a backward follows (at B 8, L 2048, D 2304
the Triton forward is faster and mamba-ssm's fwd+bwd is; see benchmarks/RESULTS.md). So the first time the
mixer meets a shape it times both scans on random inputs of that shape (fwd, or fwd+bwd when autograd is
recording) and keeps the faster for the rest of the process. The measurement draws from its own generator,
so it leaves the training RNG alone, and it is skipped while torch.compile traces (the kept choice, or
Triton, is used there).
"""
from __future__ import annotations

import functools
import statistics
import warnings
from collections.abc import Callable

import torch

# (B, L, E, N, dtype, with backward) -> "triton" | "mamba_ssm"
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


def scan_case(shape: tuple, device, dtype, backward: bool, scan: Callable) -> Callable[[], object]:
    """A call of `scan` on random inputs of the mixer's shape (B, L, E, N), as the mixer calls it."""
    B, L, E, N = shape
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*size, dt=dtype, scale=1.0):
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale).to(dt)

    u, dt_, z = rand(B, E, L), rand(B, E, L, scale=0.5), rand(B, E, L)
    Bm, Cm = rand(B, N, L), rand(B, N, L)
    A = -torch.rand(E, N, generator=g, device=device) - 0.5
    D, bias = rand(E, dt=torch.float32), rand(E, dt=torch.float32, scale=0.1)
    ins = [u, dt_, Bm, Cm, z]
    if backward:
        for t in ins:
            t.requires_grad_(True)

    def run():
        y = scan(u, dt_, A, Bm, Cm, D=D, z=z, delta_bias=bias, delta_softplus=True)
        if backward:
            torch.autograd.grad(y, ins, torch.ones_like(y))
        return y

    return run


def choose(shape: tuple, device, dtype, backward: bool, triton_scan: Callable,
           timer: Callable[[Callable[[], object]], float] = cuda_time_ms) -> str:
    """"triton" or "mamba_ssm" for this scan shape: the faster of the two as measured (once per process)."""
    key = (*shape, dtype, backward)
    if key in _choices:
        return _choices[key]
    theirs = mamba_ssm_scan()
    if theirs is None or torch.compiler.is_compiling():
        return "triton"
    with torch.enable_grad() if backward else torch.no_grad():
        times = {name: timer(scan_case(shape, device, dtype, backward, fn))
                 for name, fn in (("triton", triton_scan), ("mamba_ssm", theirs))}
    _choices[key] = min(times, key=times.get)
    if _choices[key] != "triton":
        pass_ = "fwd+bwd" if backward else "fwd"
        warnings.warn(f"mixer.backend=auto: mamba-ssm's scan measured faster for B, L, E, N = {shape} {pass_} "
                      f"({times['mamba_ssm']:.3f} against {times['triton']:.3f} ms); using it for that shape",
                      stacklevel=3)
    return _choices[key]
