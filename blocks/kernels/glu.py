"""Gated-linear-unit activation of the MoE experts, forward and backward, over rows sorted by expert.

Shapes: P sorted rows, F expert hidden width; h_PF2 is the first projection's output, gate half
first (as blocks.mlp.glu_activation): act = g(h[:, :F]) * h[:, F:], g = silu (swiglu) or erf-GELU (geglu).

The forward runs in the first grouped GEMM's epilogue (grouped_gemm.gmm_glu); this file holds the gate
functions and the backward, which also produces the gradient of each slot's gate weight w_p: the layer computes
y_p = w_p * (act_p @ W2), so with da_p = dy_p @ W2^T (the unscaled gradient of act_p) the kernel
returns d act = w_p * da_p and dw_p = <da_p, act_p>, recomputing act_p from h_p in the same pass
instead of storing the expert outputs. dw_p is written to the slot the row came from. The same pass gathers the weighted output gradient
w_p * dy[token_p] (P, D) into sorted rows for W2's gradient, so that wgrad reads plain rows.
Rows at or past offsets_E1[E] (dropped slots) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting

GATES = ("swiglu", "geglu")
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # a global a kernel reads must be a constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def glu_gate(g, GEGLU: tl.constexpr):
    if GEGLU:
        return 0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2))
    return g * tl.sigmoid(g)


@triton.jit
def glu_gate_grad(g, GEGLU: tl.constexpr):
    if GEGLU:
        return 0.5 * (1.0 + tl.math.erf(g * _SQRT1_2)) + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    s = tl.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


@triton.jit
def _glu_bwd_kernel(
    h_ptr, da_ptr, w_ptr, slot_ptr, dh_ptr, dw_ptr, offsets_ptr, dy_ptr, token_ptr, wdy_ptr, F, D, E,
    GEGLU: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0)
    if p >= tl.load(offsets_ptr + E):
        return
    w = tl.load(w_ptr + p)
    dy_row = dy_ptr + tl.load(token_ptr + p).to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dy = tl.load(dy_row + ds, mask=ds < D, other=0.0).to(tl.float32)
        tl.store(wdy_ptr + p.to(tl.int64) * D + ds, (w * dy).to(wdy_ptr.dtype.element_ty), mask=ds < D)
    h_row = h_ptr + p.to(tl.int64) * 2 * F
    dh_row = dh_ptr + p.to(tl.int64) * 2 * F
    dot = tl.zeros([BLOCK_F], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        ok = fs < F
        g = tl.load(h_row + fs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(h_row + F + fs, mask=ok, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + p.to(tl.int64) * F + fs, mask=ok, other=0.0).to(tl.float32)
        act_g = glu_gate(g, GEGLU)
        dot += da * act_g * u
        tl.store(dh_row + fs, (w * da * u * glu_gate_grad(g, GEGLU)).to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_row + F + fs, (w * da * act_g).to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + tl.load(slot_ptr + p), tl.sum(dot, axis=0))


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), 16 if interpreting() else 1024)


def glu_bwd(
    h_PF2: Tensor,
    da_PF: Tensor,
    w_P: Tensor,
    slot_P: Tensor,
    dw_S: Tensor,
    offsets_E1: Tensor,
    activation: str,
    dy_TD: Tensor,
    token_P: Tensor,
) -> tuple[Tensor, Tensor]:
    """(dh (P, 2F) for d act = w_p * da_p, wdy (P, D) = w_p * dy[token_p]), both in h's dtype; writes
    dw_S[slot_P[p]] = <da_p, act_p> (fp32). Only rows before offsets_E1[E] are computed."""
    P, F2 = h_PF2.shape
    D = dy_TD.shape[1]
    dh = torch.empty_like(h_PF2)
    wdy = torch.empty(P, D, dtype=h_PF2.dtype, device=h_PF2.device)
    if P:
        E = offsets_E1.numel() - 1
        _glu_bwd_kernel[(P,)](
            h_PF2, da_PF, w_P, slot_P, dh, dw_S, offsets_E1, dy_TD, token_P, wdy, F2 // 2, D, E,
            GEGLU=activation == "geglu", BLOCK_F=_block(F2 // 2), BLOCK_D=_block(D),
        )
    return dh, wdy
