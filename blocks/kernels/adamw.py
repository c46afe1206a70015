"""One AdamW step on an fp32 master of a low-precision weight, in one pass (optim.master_weights).

From PyTorch ops the step is a cast of the bf16 gradient to fp32 (a copy), torch's fused AdamW on the fp32
master and moments, and a copy of the master, rounded, into the weight: 44 bytes of memory traffic per
weight and three launches. Here one kernel reads the gradient in its own dtype and the master and moments
once, and writes them and the rounded weight: 28 bytes per weight (bf16), one launch per tensor. For the
BlackMamba-1.5B preset (1.5 billion weights, all updated every step) that is about 42 GB a step instead of 66.

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps added after the square
root), element by element, with step t >= 1:

    w <- w (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps);  weight <- round(w)

`master_adamw_torch_` is the same in PyTorch ops: the twin the kernel is tested against.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting

BLOCK = 2048  # elements a program; 16 per thread at 4 warps, loads of 32 bytes (bf16) per thread


@triton.jit
def _master_adamw_kernel(
    w_ptr, g_ptr, master_ptr, m_ptr, v_ptr, n, decay, beta1, beta2, step_size, bc2_sqrt, eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(master_ptr + offs, mask=ok, other=0.0)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    w = w * decay
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp
    v = beta2 * v + (1.0 - beta2) * g * g
    w = w - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    tl.store(master_ptr + offs, w, mask=ok)
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=ok)


def _scalars(step: int, lr: float, beta1: float, beta2: float, weight_decay: float) -> tuple[float, float, float]:
    if step < 1:
        raise ValueError(f"AdamW's step count starts at 1, got {step}")
    return 1.0 - lr * weight_decay, lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)


def _check(weight: Tensor, grad: Tensor, master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.shape != weight.shape:
            raise ValueError(f"{name} must be fp32 of the weight's shape {tuple(weight.shape)}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if grad.shape != weight.shape:
        raise ValueError(f"the gradient's shape {tuple(grad.shape)} is not the weight's {tuple(weight.shape)}")


def master_adamw_triton_(weight: Tensor, grad: Tensor, master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                         step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The step in place on master, exp_avg, exp_avg_sq (fp32) and weight (any float dtype; the master itself
    for an fp32 weight); grad in any float dtype. All contiguous and of one shape."""
    _check(weight, grad, master, exp_avg, exp_avg_sq)
    tensors = (weight, grad, master, exp_avg, exp_avg_sq)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("master_adamw_triton_ needs contiguous tensors")
    decay, step_size, bc2_sqrt = _scalars(step, lr, beta1, beta2, weight_decay)
    n = weight.numel()
    if n == 0:
        return
    block = 64 if interpreting() else BLOCK
    _master_adamw_kernel[(triton.cdiv(n, block),)](
        weight, grad, master, exp_avg, exp_avg_sq, n, decay, beta1, beta2, step_size, bc2_sqrt, eps,
        BLOCK=block, **({} if interpreting() else {"num_warps": 4}),
    )


@torch.no_grad()
def master_adamw_torch_(weight: Tensor, grad: Tensor, master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                        step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The twin: torch.optim.AdamW's single-tensor update in PyTorch ops on the fp32 master."""
    _check(weight, grad, master, exp_avg, exp_avg_sq)
    decay, step_size, bc2_sqrt = _scalars(step, lr, beta1, beta2, weight_decay)
    g = grad.float()
    master.mul_(decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    master.addcdiv_(exp_avg, exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
    if weight.data_ptr() != master.data_ptr():
        weight.copy_(master)
