"""Triton kernels for the blocks, each with a pure-PyTorch reference twin that it is tested against.

Dispatch rule used everywhere: a kernel runs when its inputs are on a CUDA device and Triton imports;
otherwise the PyTorch reference runs. On the CPU, tests run the kernels through Triton's interpreter
(TRITON_INTERPRET=1, set before Triton is imported; fp32/fp16, tiny shapes), either by calling them
directly or by forcing the dispatch with `force_triton()`. `pytorch_reference()` does the opposite: the
references run even on CUDA tensors, to check a whole model's kernel path against its reference path;
`pytorch_reference("gate", ...)` turns off only the named kernels (KERNELS), to measure what each one buys.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_forced = False
_disabled = False
_disabled_kernels: frozenset[str] = frozenset()
# the kernels that pytorch_reference(name) can turn off one by one (the name each dispatch site passes)
KERNELS = ("add_norm", "cross_entropy", "gate", "moe_experts")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it is a dependency on Linux only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors, with a single autotune config."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, kernel: str | None = None) -> bool:
    """Whether the fused kernels should run for these inputs: Triton imports and the tensors are on a
    CUDA device, or `force_triton()` is active and Triton is interpreting on the CPU; never inside
    `pytorch_reference()`, nor for a `kernel` (one of KERNELS) that `pytorch_reference(kernel)` turned off."""
    if _disabled or kernel in _disabled_kernels or not triton_available():
        return False
    if _forced and interpreting():
        return True
    return all(t.is_cuda for t in tensors)


@contextlib.contextmanager
def force_triton() -> Iterator[None]:
    """Route CPU tensors through the Triton kernels (under TRITON_INTERPRET=1), for tests."""
    global _forced
    if not interpreting():
        raise RuntimeError("force_triton() needs TRITON_INTERPRET=1 set before triton is imported")
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def pytorch_reference(*kernels: str) -> Iterator[None]:
    """Run the PyTorch reference twins instead of the kernels, on any device (a mixer with backend=auto
    included), e.g. to compare a model's loss on the GPU with and without its kernels. With names (from
    KERNELS), only those kernels are turned off and every other one still runs."""
    global _disabled, _disabled_kernels
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"pytorch_reference: unknown kernel(s) {', '.join(unknown)}; valid: {', '.join(KERNELS)}")
    previous = _disabled, _disabled_kernels
    if kernels:
        _disabled_kernels = _disabled_kernels | frozenset(kernels)
    else:
        _disabled = True
    try:
        yield
    finally:
        _disabled, _disabled_kernels = previous
