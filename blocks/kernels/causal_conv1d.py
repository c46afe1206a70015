"""Triton causal depthwise conv1d with bias and SiLU fused, forward and backward; twin of blocks/conv.py.

    y[c, t] = act(bias[c] + sum_k w[c, k] x[c, t - K + 1 + k]),   zeros before t = 0,   act = SiLU or identity

Shapes: x (B, C, L) with any strides (the mixer passes a view of in_proj's (B, L, 2C) output), w (C, K),
bias (C,). The output is laid out (B, L, C) when x is channels-last, so the next matmul reads it in place.
One program per (batch, BLOCK_L steps, BLOCK_C channels); the K shifted input tiles come from cache.

Backward in two kernels: dpre = dy act'(pre) (pre recomputed, not stored) with the per-(batch, time block)
fp32 partials of dw and dbias, summed afterwards (deterministic); then dx_t = sum_j w[K-1-j] dpre_{t+j}.
dpre takes one extra write and read in x's dtype, which keeps both kernels small (no register spills).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting
from blocks.kernels.selective_scan import empty_like_bdl


@triton.jit
def _pre(x_ptr, w_ptr, bias, s, c, s_ok, c_ok, L, s_xl, s_xc, s_wc, s_wk, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The pre-activation at positions s (BLOCK_L,) and channels c (BLOCK_C,), fp32 (BLOCK_L, BLOCK_C)."""
    acc = tl.zeros([s.shape[0], c.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        acc += bias[None, :]
    for k in tl.static_range(K):
        src = s - (K - 1) + k
        ok = ((src >= 0) & (src < L) & s_ok)[:, None] & c_ok[None, :]
        xk = tl.load(x_ptr + src[:, None] * s_xl + c[None, :] * s_xc, mask=ok, other=0.0).to(tl.float32)
        acc += xk * tl.load(w_ptr + c * s_wc + k * s_wk, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, C, L,
    s_xb, s_xc, s_xl, s_yb, s_yc, s_yl, s_wc, s_wk,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, c_ok = t < L, c < C
    bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
    y = _pre(x_ptr + b * s_xb, w_ptr, bias, t, c, t_ok, c_ok, L, s_xl, s_xc, s_wc, s_wk, K, HAS_BIAS)
    if SILU:
        y *= tl.sigmoid(y)
    ok = t_ok[:, None] & c_ok[None, :]
    tl.store(y_ptr + b * s_yb + t[:, None] * s_yl + c[None, :] * s_yc, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_bwd_dpre_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, dpre_ptr, dw_ptr, db_ptr, C, L,
    s_xb, s_xc, s_xl, s_gb, s_gc, s_gl, s_pb, s_pc, s_pl, s_wc, s_wk,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dpre = dy act'(pre) (pre recomputed), stored like dy's shape; fp32 partials dw (B * n_lblocks, C, K)
    and db (B * n_lblocks, C) from the same K shifted input tiles."""
    pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, c_ok = t < L, c < C
    ok = t_ok[:, None] & c_ok[None, :]
    x_ptr += b * s_xb
    dpre = tl.load(dy_ptr + b * s_gb + t[:, None] * s_gl + c[None, :] * s_gc, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
        pre = _pre(x_ptr, w_ptr, bias, t, c, t_ok, c_ok, L, s_xl, s_xc, s_wc, s_wk, K, HAS_BIAS)
        sig = tl.sigmoid(pre)
        dpre *= sig * (1.0 + pre * (1.0 - sig))
    part = (b * tl.num_programs(0) + pid_l) * C + c
    kk = tl.arange(0, KP)
    dw = tl.zeros([BLOCK_C, KP], dtype=tl.float32)
    for k in tl.static_range(K):  # the recomputation's loads again: with no store in between, reused
        src = t - (K - 1) + k
        x_ok = ((src >= 0) & t_ok)[:, None] & c_ok[None, :]
        xk = tl.load(x_ptr + src[:, None] * s_xl + c[None, :] * s_xc, mask=x_ok, other=0.0).to(tl.float32)
        dw += tl.where((kk == k)[None, :], tl.sum(dpre * xk, 0)[:, None], 0.0)
    tl.store(dw_ptr + part[:, None] * K + kk[None, :], dw, mask=c_ok[:, None] & (kk < K)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part, tl.sum(dpre, 0), mask=c_ok)
    tl.store(dpre_ptr + b * s_pb + t[:, None] * s_pl + c[None, :] * s_pc, dpre.to(dpre_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, w_ptr, dx_ptr, C, L, s_pb, s_pc, s_pl, s_dxb, s_dxc, s_dxl, s_wc, s_wk,
    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx_t = sum_j w[K - 1 - j] dpre_{t + j}: the output at t + j saw x_t through that tap."""
    pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dpre_ptr += b * s_pb
    dx = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        s = t + j
        ok = (s < L)[:, None] & c_ok[None, :]
        dpre = tl.load(dpre_ptr + s[:, None] * s_pl + c[None, :] * s_pc, mask=ok, other=0.0).to(tl.float32)
        dx += dpre * tl.load(w_ptr + c * s_wc + (K - 1 - j) * s_wk, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    ok = (t < L)[:, None] & c_ok[None, :]
    tl.store(dx_ptr + b * s_dxb + t[:, None] * s_dxl + c[None, :] * s_dxc, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _blocks() -> tuple[int, int]:
    return (8, 4) if interpreting() else (32, 64)


def conv_forward(x: Tensor, w: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """y = act(conv(x) + bias), laid out as empty_like_bdl(x)."""
    Bsz, C, L = x.shape
    BL, BC = _blocks()
    y = empty_like_bdl(x)
    _conv_fwd_kernel[(triton.cdiv(L, BL), triton.cdiv(C, BC), Bsz)](
        x, w, bias, y, C, L, *x.stride(), *y.stride(), *w.stride(),
        K=w.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=BL, BLOCK_C=BC,
    )
    return y


def conv_backward(
    dy: Tensor, x: Tensor, w: Tensor, bias: Tensor | None, silu: bool, dx: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dx, dw, dbias) of conv_forward; dx is written into `dx` (any strides) when given."""
    Bsz, C, L = x.shape
    K = w.shape[1]
    BL, BC = _blocks()
    grid = (triton.cdiv(L, BL), triton.cdiv(C, BC), Bsz)
    dpre = empty_like_bdl(x)
    dx = empty_like_bdl(x) if dx is None else dx
    dw = torch.empty(Bsz * grid[0], C, K, device=x.device, dtype=torch.float32)
    db = torch.empty(Bsz * grid[0], C, device=x.device, dtype=torch.float32) if bias is not None else None
    _conv_bwd_dpre_kernel[grid](
        x, w, bias, dy, dpre, dw, db, C, L, *x.stride(), *dy.stride(), *dpre.stride(), *w.stride(),
        K=K, KP=triton.next_power_of_2(K), HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=BL, BLOCK_C=BC,
    )
    _conv_bwd_dx_kernel[grid](
        dpre, w, dx, C, L, *dpre.stride(), *dx.stride(), *w.stride(), K=K, BLOCK_L=BL, BLOCK_C=BC,
    )
    return dx, dw.sum(0).to(w.dtype), None if db is None else db.sum(0).to(bias.dtype)


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, silu):
        ctx.save_for_backward(x, w, bias)
        ctx.silu = silu
        return conv_forward(x, w, bias, silu)

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        return *conv_backward(dy, x, w, bias, ctx.silu), None


@torch.compiler.disable  # torch.compile does not trace into Triton autotuners: a graph break
def causal_conv1d_triton(x_BCL: Tensor, weight_CK: Tensor, bias_C: Tensor | None = None, silu: bool = False) -> Tensor:
    """act(causal depthwise conv(x) + bias) as `blocks.conv.causal_conv1d` (then SiLU if silu), any K."""
    return _CausalConv1d.apply(x_BCL, weight_CK, bias_C, silu)


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, y_ptr, C,
    s_xb, s_xc, s_sb, s_sc, s_sk, s_yb, s_yc, s_wc, s_wk,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """state (B, C, K) <- [state[:, :, 1:], x]; y = act(state . w + bias), one program per (batch, channel block)."""
    pid_c, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, KP)
    c_ok = c < C
    ck_ok = c_ok[:, None] & (k < K)[None, :]
    state_ptr += b * s_sb
    x = tl.load(x_ptr + b * s_xb + c * s_xc, mask=c_ok, other=0.0)
    # shifted window: position k takes the old k + 1, the last one the new input
    old = tl.load(state_ptr + c[:, None] * s_sc + (k + 1)[None, :] * s_sk, mask=ck_ok & (k + 1 < K)[None, :], other=0.0)
    window = tl.where((k == K - 1)[None, :], x[:, None].to(old.dtype), old)
    tl.store(state_ptr + c[:, None] * s_sc + k[None, :] * s_sk, window, mask=ck_ok)
    w = tl.load(w_ptr + c[:, None] * s_wc + k[None, :] * s_wk, mask=ck_ok, other=0.0).to(tl.float32)
    y = tl.sum(window.to(tl.float32) * w, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    if SILU:
        y *= tl.sigmoid(y)
    tl.store(y_ptr + b * s_yb + c * s_yc, y.to(y_ptr.dtype.element_ty), mask=c_ok)


def causal_conv1d_step_triton(
    x_BC: Tensor, state_BCK: Tensor, weight_CK: Tensor, bias_C: Tensor | None = None, silu: bool = False
) -> Tensor:
    """`blocks.conv.causal_conv1d_step` (then SiLU if silu) in one kernel; the state is updated in place."""
    Bsz, C = x_BC.shape
    K = weight_CK.shape[1]
    y = torch.empty_like(x_BC)
    BC = 4 if interpreting() else 128
    _conv_step_kernel[(triton.cdiv(C, BC), Bsz)](
        x_BC, state_BCK, weight_CK, bias_C, y, C,
        *x_BC.stride(), *state_BCK.stride(), *y.stride(), *weight_CK.stride(),
        K=K, KP=triton.next_power_of_2(K), HAS_BIAS=bias_C is not None, SILU=silu, BLOCK_C=BC,
    )
    return y
