"""Gated-linear-unit activation of the MoE experts, forward and backward, over rows sorted by expert.

Shapes: P sorted rows, F expert hidden width; h_PF2 is the first projection's output, gate half
first (as blocks.mlp.glu_activation): act = g(h[:, :F]) * h[:, F:], g = silu (swiglu) or erf-GELU (geglu).

The backward also produces the gradient of each slot's gate weight w_p: the layer computes
y_p = w_p * (act_p @ W2), so with da_p = dy_p @ W2^T (the unscaled gradient of act_p) the kernel
returns d act = w_p * da_p and dw_p = <da_p, act_p>, recomputing act_p from h_p in the same pass
instead of storing the expert outputs. dw_p is written to the slot the row came from.
Rows at or past offsets_E1[E] (dropped slots) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting

GATES = ("swiglu", "geglu")
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _gate(g, GEGLU: tl.constexpr):
    if GEGLU:
        return 0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2))
    return g * tl.sigmoid(g)


@triton.jit
def _gate_grad(g, GEGLU: tl.constexpr):
    if GEGLU:
        return 0.5 * (1.0 + tl.math.erf(g * _SQRT1_2)) + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    s = tl.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


@triton.jit
def _glu_fwd_kernel(h_ptr, act_ptr, offsets_ptr, F, E, GEGLU: tl.constexpr, BLOCK_F: tl.constexpr):
    p = tl.program_id(0)
    if p >= tl.load(offsets_ptr + E):
        return
    h_row = h_ptr + p.to(tl.int64) * 2 * F
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        ok = fs < F
        g = tl.load(h_row + fs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(h_row + F + fs, mask=ok, other=0.0).to(tl.float32)
        tl.store(act_ptr + p.to(tl.int64) * F + fs, (_gate(g, GEGLU) * u).to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _glu_bwd_kernel(
    h_ptr, da_ptr, w_ptr, slot_ptr, dh_ptr, dw_ptr, offsets_ptr, F, E, GEGLU: tl.constexpr, BLOCK_F: tl.constexpr
):
    p = tl.program_id(0)
    if p >= tl.load(offsets_ptr + E):
        return
    w = tl.load(w_ptr + p)
    h_row = h_ptr + p.to(tl.int64) * 2 * F
    dh_row = dh_ptr + p.to(tl.int64) * 2 * F
    dot = tl.zeros([BLOCK_F], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        ok = fs < F
        g = tl.load(h_row + fs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(h_row + F + fs, mask=ok, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + p.to(tl.int64) * F + fs, mask=ok, other=0.0).to(tl.float32)
        act_g = _gate(g, GEGLU)
        dot += da * act_g * u
        tl.store(dh_row + fs, (w * da * u * _gate_grad(g, GEGLU)).to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_row + F + fs, (w * da * act_g).to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + tl.load(slot_ptr + p), tl.sum(dot, axis=0))


def _block_f(F: int) -> int:
    return min(triton.next_power_of_2(F), 16 if interpreting() else 1024)


def glu_fwd(h_PF2: Tensor, offsets_E1: Tensor, activation: str) -> Tensor:
    """act (P, F) = gate(h[:, :F]) * h[:, F:] for the rows before offsets_E1[-1]; later rows are unset."""
    P, F2 = h_PF2.shape
    act = torch.empty(P, F2 // 2, dtype=h_PF2.dtype, device=h_PF2.device)
    if P:
        E = offsets_E1.numel() - 1
        _glu_fwd_kernel[(P,)](h_PF2, act, offsets_E1, F2 // 2, E, GEGLU=activation == "geglu", BLOCK_F=_block_f(F2 // 2))
    return act


def glu_bwd(
    h_PF2: Tensor, da_PF: Tensor, w_P: Tensor, slot_P: Tensor, dw_S: Tensor, offsets_E1: Tensor, activation: str
) -> Tensor:
    """dh (P, 2F) for d act = w_p * da_p; writes dw_S[slot_P[p]] = <da_p, act_p> (fp32) for active rows."""
    P, F2 = h_PF2.shape
    dh = torch.empty_like(h_PF2)
    if P:
        E = offsets_E1.numel() - 1
        _glu_bwd_kernel[(P,)](
            h_PF2, da_PF, w_P, slot_P, dh, dw_S, offsets_E1, F2 // 2, E,
            GEGLU=activation == "geglu", BLOCK_F=_block_f(F2 // 2),
        )
    return dh
