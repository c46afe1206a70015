"""The MoE router's logits in fp32 from the normed input in its own dtype, forward and backward.

The router runs in fp32 (its logits decide the routing; Switch Transformers keeps it there): logits = x W^T + b
with x (T, D) the normed tokens, W (E, D), E = 8 for BlackMamba. From PyTorch ops under bf16-mixed that is a
cast of x to fp32 (T x D, the width of the whole activation) and three fp32 GEMMs with 8 columns, which cuBLAS
runs on CUDA cores at a fraction of the bandwidth (about 2.3 ms of the 1.5B preset's fwd+bwd for 15 layers,
plus 1.4 ms of casts, on an H100). Here each pass reads x once in its own dtype:

    forward    logits = x W^T + b                       (fp32 products, fp32 accumulation)
    backward   dx = dlogits W (in x's dtype),  dW = dlogits^T x,  db = sum_t dlogits

The backward kernel forms dx and each program's share of dW in the same pass over x; the shares are added
after, in a fixed order. The twin, gate_logits_torch, is F.linear on fp32 copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting


@triton.jit
def _gate_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, T, D, E, HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    es = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + ts.to(tl.int64)[:, None] * D + ds[None, :],
                    mask=(ts[:, None] < T) & (ds[None, :] < D), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + es[None, :] * D + ds[:, None], mask=(es[None, :] < E) & (ds[:, None] < D),
                    other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_E): W^T
        acc = tl.dot(x, w, acc, input_precision="ieee")
    if HAS_B:
        acc += tl.load(b_ptr + es, mask=es < E, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * E + es[None, :], acc, mask=(ts[:, None] < T) & (es[None, :] < E))


@triton.jit
def _gate_bwd_kernel(
    g_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, T, D, E, blocks_per_program,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (p, j): columns j*BLOCK_D.. of dx for row blocks p, p + P, ..., and its share of dW's columns."""
    p, P = tl.program_id(0), tl.num_programs(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    es = tl.arange(0, BLOCK_E)
    w = tl.load(w_ptr + es[:, None] * D + ds[None, :], mask=(es[:, None] < E) & (ds[None, :] < D),
                other=0.0).to(tl.float32)  # (BLOCK_E, BLOCK_D)
    dw = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    for i in range(0, blocks_per_program):
        ts = (p + i * P) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = ts < T
        g = tl.load(g_ptr + ts.to(tl.int64)[:, None] * E + es[None, :], mask=t_ok[:, None] & (es[None, :] < E),
                    other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_E)
        offs = ts.to(tl.int64)[:, None] * D + ds[None, :]
        ok = t_ok[:, None] & (ds[None, :] < D)
        dx = tl.dot(g, w, input_precision="ieee")
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dw = tl.dot(tl.trans(g), x, dw, input_precision="ieee")
    tl.store(dw_ptr + p.to(tl.int64) * E * D + es[:, None] * D + ds[None, :], dw,
             mask=(es[:, None] < E) & (ds[None, :] < D))


def _blocks(E: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_D, num_warps); tl.dot needs 16 at least in every dimension."""
    block_e = max(16, triton.next_power_of_2(E))
    if interpreting():
        return 16, block_e, 16, 1
    return 64, block_e, 64, 4


def _programs(T: int, block_t: int, device: torch.device) -> int:
    """Row-block programs of the backward: each adds its dW share; a few per SM in all, with the columns."""
    blocks = triton.cdiv(T, block_t)
    if interpreting() or device.type != "cuda":
        return min(blocks, 2)
    return min(blocks, 64)


class _GateLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, w_ED: Tensor, b_E: Tensor | None) -> Tensor:
        T, D = x_TD.shape
        E = w_ED.shape[0]
        x_TD, w_ED = x_TD.contiguous(), w_ED.contiguous()
        out = torch.empty(T, E, device=x_TD.device, dtype=torch.float32)
        block_t, block_e, block_d, warps = _blocks(E)
        _gate_fwd_kernel[(triton.cdiv(T, block_t),)](
            x_TD, w_ED, w_ED if b_E is None else b_E, out, T, D, E, b_E is not None, block_t, block_e, block_d,
            num_warps=warps,
        )
        ctx.save_for_backward(x_TD, w_ED)
        ctx.b_dtype = None if b_E is None else b_E.dtype
        return out

    @staticmethod
    def backward(ctx, g_TE: Tensor):
        x_TD, w_ED = ctx.saved_tensors
        T, D = x_TD.shape
        E = w_ED.shape[0]
        g_TE = g_TE.contiguous()
        block_t, block_e, block_d, warps = _blocks(E)
        P = _programs(T, block_t, x_TD.device)
        dx = torch.empty_like(x_TD)
        dw_part = torch.empty(P, E, D, device=x_TD.device, dtype=torch.float32)
        _gate_bwd_kernel[(P, triton.cdiv(D, block_d))](
            g_TE, x_TD, w_ED, dx, dw_part, T, D, E, triton.cdiv(triton.cdiv(T, block_t), P),
            block_t, block_e, block_d, num_warps=warps,
        )
        db = None if ctx.b_dtype is None else g_TE.sum(0).to(ctx.b_dtype)
        return dx, dw_part.sum(0).to(w_ED.dtype), db


@torch.compiler.disable  # torch.compile does not trace into Triton kernels launched from autograd functions
def gate_logits_triton(x_TD: Tensor, w_ED: Tensor, b_E: Tensor | None) -> Tensor:
    """fp32 router logits (T, E) = x W^T + b for x (T, D) in any float dtype and an nn.Linear's weight (E, D)
    and bias (E,) or None. Differentiable in all three."""
    if x_TD.dim() != 2 or w_ED.dim() != 2 or w_ED.shape[1] != x_TD.shape[1]:
        raise ValueError(f"gate_logits: x (T, D) and weight (E, D) expected, got {tuple(x_TD.shape)} and "
                         f"{tuple(w_ED.shape)}")
    return _GateLogits.apply(x_TD, w_ED, b_E)


def gate_logits_torch(x_TD: Tensor, w_ED: Tensor, b_E: Tensor | None) -> Tensor:
    """The twin: F.linear on fp32 copies."""
    return F.linear(x_TD.float(), w_ED.float(), None if b_E is None else b_E.float())
