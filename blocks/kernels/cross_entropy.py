"""Next-token cross-entropy from the LM head's logits, forward and backward, without an fp32 copy of them.

`F.cross_entropy(logits.float(), y)` on the (N, V) bf16 logits of a training batch (N = B L = 16,384 tokens,
V = 50,304: 1.6 GB) writes an fp32 copy, fp32 log-probabilities for the backward, and reads both again:
about 12 ms of the 1.5B preset's fwd+bwd. Here the forward reads the logits once, keeping a running maximum
and sum of exponentials per row, and stores each row's log-sum-exp and loss:

    lse_n = log sum_v exp(x_nv),   loss_n = lse_n - x_{n, y_n}

and the backward reads them once more and writes the gradient in the logits' dtype:

    d x_nv = g_n (exp(x_nv - lse_n) - [v == y_n]),   g_n = d L / d loss_n

Rows whose target is ignore_index have loss 0 and gradient 0; a target outside [0, V) gives a NaN loss (a
visible failure; F.cross_entropy raises). All arithmetic is fp32. The twin is F.cross_entropy on fp32 logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting

_FAR_BELOW = tl.constexpr(-1.0e30)  # the running maximum's start: finite, so masked lanes add exp(-inf) = 0


@triton.jit
def _ce_fwd_kernel(x_ptr, y_ptr, lse_ptr, loss_ptr, V, stride_n, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(0)
    row = x_ptr + n.to(tl.int64) * stride_n
    m = tl.full([BLOCK_V], _FAR_BELOW, tl.float32)  # per lane: running max and sum of exp(x - max)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row + vs, mask=vs < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    y = tl.load(y_ptr + n)
    inside = (y >= 0) & (y < V)
    x_y = tl.load(row + tl.where(inside, y, 0)).to(tl.float32)
    loss = tl.where(inside, lse - x_y, float("nan"))
    tl.store(lse_ptr + n, lse)
    tl.store(loss_ptr + n, tl.where(y == IGNORE, 0.0, loss))


@triton.jit
def _ce_bwd_kernel(
    x_ptr, y_ptr, lse_ptr, g_ptr, dx_ptr, V, stride_n, stride_dn, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0)
    vs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    y = tl.load(y_ptr + n)
    g = tl.where(y == IGNORE, 0.0, tl.load(g_ptr + n))
    x = tl.load(x_ptr + n.to(tl.int64) * stride_n + vs, mask=vs < V, other=0.0).to(tl.float32)
    dx = g * (tl.exp(x - tl.load(lse_ptr + n)) - tl.where(vs == y, 1.0, 0.0))
    tl.store(dx_ptr + n.to(tl.int64) * stride_dn + vs, dx.to(dx_ptr.dtype.element_ty), mask=vs < V)


def _block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4,096 logits a step on a GPU; small blocks under the interpreter."""
    if interpreting():
        return min(64, triton.next_power_of_2(V)), 1
    return min(4096, triton.next_power_of_2(V)), 8


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NV: Tensor, y_N: Tensor, ignore_index: int) -> Tensor:
        N, V = x_NV.shape
        if x_NV.stride(1) != 1:
            x_NV = x_NV.contiguous()
        y_N = y_N.contiguous()
        lse_N = torch.empty(N, device=x_NV.device, dtype=torch.float32)
        loss_N = torch.empty_like(lse_N)
        block_v, warps = _block_v(V)
        _ce_fwd_kernel[(N,)](x_NV, y_N, lse_N, loss_N, V, x_NV.stride(0), ignore_index, block_v, num_warps=warps)
        ctx.save_for_backward(x_NV, y_N, lse_N)
        ctx.ignore_index = ignore_index
        return loss_N

    @staticmethod
    def backward(ctx, g_N: Tensor):
        x_NV, y_N, lse_N = ctx.saved_tensors
        N, V = x_NV.shape
        dx_NV = torch.empty_like(x_NV)
        block_v, warps = _block_v(V)
        _ce_bwd_kernel[(N, triton.cdiv(V, block_v))](
            x_NV, y_N, lse_N, g_N.float().contiguous(), dx_NV, V, x_NV.stride(0), dx_NV.stride(0),
            ctx.ignore_index, block_v, num_warps=warps,
        )
        return dx_NV, None, None


@torch.compiler.disable  # torch.compile does not trace into Triton kernels launched from autograd functions
def cross_entropy_triton(x_NV: Tensor, y_N: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """The loss of logits x_NV (N, V, any float dtype) against integer targets y_N (N,), in fp32; reduction
    "mean" (over the rows not ignored, as F.cross_entropy), "sum" or "none". Differentiable in x_NV."""
    if x_NV.dim() != 2 or y_N.shape != x_NV.shape[:1]:
        raise ValueError(f"cross_entropy: logits (N, V) and targets (N,) expected, got {tuple(x_NV.shape)} "
                         f"and {tuple(y_N.shape)}")
    loss_N = _CrossEntropy.apply(x_NV, y_N, ignore_index)
    if reduction == "none":
        return loss_N
    if reduction == "sum":
        return loss_N.sum()
    if reduction == "mean":
        return loss_N.sum() / (y_N != ignore_index).sum()
    raise ValueError(f"cross_entropy: unknown reduction {reduction!r}; choose 'mean', 'sum' or 'none'")


def cross_entropy_torch(x_NV: Tensor, y_N: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """The twin: F.cross_entropy on the logits in fp32."""
    return F.cross_entropy(x_NV.float(), y_N, ignore_index=ignore_index, reduction=reduction)
