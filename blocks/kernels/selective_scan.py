"""Triton kernels for the Mamba-1 selective scan, forward and backward; the twin of blocks/scan.py.

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,    y_t = (C_t . h_t + D u_t) * silu(z_t)

with delta_t = softplus(delta_raw_t + delta_bias) when asked. Shapes (any strides): u, delta, z (B, D, L);
A (D, N); B, C (B, N, L); D, delta_bias (D,); states (B, D, N) fp32. Both layouts the Mamba code uses
are fast: mamba-ssm's (B, D, L) contiguous along L, and this repo's (B, L, D) views contiguous along D.

One program per (batch, block of BLOCK_D channels) holds its state h (BLOCK_D, N) in fp32 registers and
walks the sequence in chunks of CHUNK steps. A chunk is a (BLOCK_D, N, CHUNK) tile of decays
a = exp(delta A) and inputs x = delta u B, turned into states by `tl.associative_scan` over time with
(a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2), then offset by the carried state: h_t = (prod a) h_start + x_t.
Only products of decays in (0, 1] are formed, so no exp(+cumsum) can overflow.

Backward: the forward saves the state at every chunk start (B, L / CHUNK, D, N) fp32, 1/CHUNK of the
(B, D, N, L) states; the backward walks the chunks right to left, recomputes a chunk's states from its
saved start, and runs the adjoint g_t = C_t gy_t + a_{t+1} g_{t+1} as a scan of the time-reversed chunk (a_{t+1}
from delta loaded one step ahead, a second exp rather than a register shift). Gradients:
    dx_t = g_t -> du, ddelta, dB;   d(delta_t A) = g_t a_t h_{t-1} = g_t (h_t - x_t) -> ddelta, dA;   dC from h_t gy_t.
Reductions: dA, dD, d delta_bias as per-batch partials, summed afterwards by torch (deterministic); dB and dC
summed over the channel blocks by fp32 atomic adds (ScanTiles.bc_atomic, the default: faster, but the order of
the adds varies run to run), or written as per-channel-block partials (B, D / BLOCK_D, N, L) and summed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from typing import NamedTuple

from blocks.kernels import interpreting

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _combine(a1, x1, a2, x2):
    """Compose two steps h -> a h + x, the earlier one first."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x; on the GPU the bare MUFU instruction (results below 2^-126 flush to 0, harmless for decays)."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """log(1 + e^x) through exp2/log2 (absolute error ~1e-7); x above 20 passes through."""
    e1 = 1.0 + _exp2(x * LOG2E, FAST)
    if FAST:
        lg = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [e1], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lg = tl.log2(e1)
    return tl.where(x > 20.0, x, lg * LN2)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    e1 = 1.0 + _exp2(-x * LOG2E, FAST)
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [e1], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / e1


@triton.jit
def _delta(raw, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """delta (fp32) from its loaded tile: bias added, softplus applied, 0 where masked (an identity step);
    and the pre-softplus value, whose sigmoid is the softplus derivative."""
    pre = raw.to(tl.float32)
    if HAS_BIAS:
        pre += bias[None, :]
    dt = _softplus(pre, FAST) if SOFTPLUS else pre
    return tl.where(mask, dt, 0.0), pre


@triton.jit
def _fwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, l, d, n, L, d_ok, n_ok,
               s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, HAS_Z: tl.constexpr):
    """The tiles of steps l (CHUNK,): u, delta, z (CHUNK, BLOCK_D) and B, C (CHUNK, N), as stored; 0 outside [0, L)."""
    l_ok = (l >= 0) & (l < L)
    td_ok = l_ok[:, None] & d_ok[None, :]
    tn_ok = l_ok[:, None] & n_ok[None, :]
    u = tl.load(u_ptr + l[:, None] * s_ul + d[None, :] * s_ud, mask=td_ok, other=0.0)
    raw = tl.load(delta_ptr + l[:, None] * s_dl + d[None, :] * s_dd, mask=td_ok, other=0.0)
    Bt = tl.load(B_ptr + l[:, None] * s_Bl + n[None, :] * s_Bn, mask=tn_ok, other=0.0)
    Ct = tl.load(C_ptr + l[:, None] * s_Cl + n[None, :] * s_Cn, mask=tn_ok, other=0.0)
    zt = tl.load(z_ptr + l[:, None] * s_zl + d[None, :] * s_zd, mask=td_ok, other=0.0) if HAS_Z else u
    return u, raw, Bt, Ct, zt


@triton.jit
def _bwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dy_ptr, states_ptr, c, t, d, n, L, d_ok, n_ok, nd_ok,
               DIM, N: tl.constexpr, CHUNK: tl.constexpr, STATE_EVERY: tl.constexpr,
               s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, s_gl, s_gd, HAS_Z: tl.constexpr):
    """Chunk c's forward tiles, delta one step ahead, dy, and the state saved at its start (tiles 0 for c < 0)."""
    l = c * CHUNK + t
    u, raw, Bt, Ct, zt = _fwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, l, d, n, L, d_ok, n_ok,
                                    s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, HAS_Z)
    ahead = ((l >= 0) & (l + 1 < L))[:, None] & d_ok[None, :]
    raw_next = tl.load(delta_ptr + (l + 1)[:, None] * s_dl + d[None, :] * s_dd, mask=ahead, other=0.0)
    td_ok = ((l >= 0) & (l < L))[:, None] & d_ok[None, :]
    gy = tl.load(dy_ptr + l[:, None] * s_gl + d[None, :] * s_gd, mask=td_ok, other=0.0)
    c_state = tl.maximum(c, 0) * STATE_EVERY  # c < 0 (past the first chunk) rereads a valid state, unused
    h0 = tl.load(states_ptr + c_state * DIM * N + d[None, :] * N + n[:, None], mask=nd_ok, other=0.0)
    return u, raw, raw_next, Bt, Ct, gy, zt, h0


@triton.jit
def _at(x, t, i):
    """x[i] along axis 0 of a (CHUNK, ...) tile. The time axis is held within each thread, so the masks are
    compile-time constants and, with -0.0 as the neutral element, the sum folds to a register read."""
    return tl.sum(tl.where((t == i)[:, None, None], x, -0.0), 0)


# Tiles are laid out time-first, (CHUNK, N, BLOCK_D): Triton spreads lanes over the last axis, so each thread
# holds whole chunks of time (the scans run sequentially in registers, without shuffles), the sum over N is
# mostly within a thread, and channels lie along lanes.
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, states_ptr, last_ptr,
    DIM, L, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
    s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_Ad, s_An,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_LAST: tl.constexpr, FAST: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    t = tl.arange(0, CHUNK)
    d_ok, n_ok = d < DIM, n < N
    nd_ok = n_ok[:, None] & d_ok[None, :]
    A2 = tl.load(A_ptr + n[:, None] * s_An + d[None, :] * s_Ad, mask=nd_ok, other=0.0).to(tl.float32) * LOG2E
    Dv = tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_D else None
    bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
    state_offs = (b * DIM + d[None, :]) * N + n[:, None]  # (N, BLOCK_D) into (B, D, N)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=nd_ok, other=0.0)
    else:
        h = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    if HAS_Z:
        z_ptr += b * s_zb
    y_ptr += b * s_yb
    B_ptr += b * s_Bb
    C_ptr += b * s_Cb
    # each iteration issues the next chunk's loads before computing this one, so their latency is hidden
    nxt = _fwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, t, d, n, L, d_ok, n_ok,
                     s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, HAS_Z)
    for c in range(n_chunks):
        u, raw, Bt, Ct, zt = nxt
        l = c * CHUNK + t
        nxt = _fwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, l + CHUNK, d, n, L, d_ok, n_ok,
                         s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, HAS_Z)
        td_ok = (l < L)[:, None] & d_ok[None, :]
        u, Bt, Ct = u.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32)
        dt, _ = _delta(raw, bias, td_ok, HAS_BIAS, SOFTPLUS, FAST)
        if SAVE_STATES:
            tl.store(states_ptr + (b * n_chunks + c) * DIM * N + d[None, :] * N + n[:, None], h, mask=nd_ok)
        a = _exp2(dt[:, None, :] * A2[None, :, :], FAST)  # (CHUNK, N, BLOCK_D)
        x = (dt * u)[:, None, :] * Bt[:, :, None]
        a, x = tl.associative_scan((a, x), 0, _combine)
        hs = a * h[None, :, :] + x  # h_t for the CHUNK steps
        y = tl.sum(hs * Ct[:, :, None], 1)  # (CHUNK, BLOCK_D)
        h = _at(hs, t, CHUNK - 1)  # steps past L are identities, so this is also the state at L - 1
        if HAS_D:
            y += u * Dv[None, :]
        if HAS_Z:
            zt = zt.to(tl.float32)
            y *= zt * _sigmoid(zt, FAST)
        tl.store(y_ptr + l[:, None] * s_yl + d[None, :] * s_yd, y.to(y_ptr.dtype.element_ty), mask=td_ok)
    if SAVE_LAST:
        tl.store(last_ptr + state_offs, h, mask=nd_ok)


@triton.jit
def _store_bc(ptrs, vals, mask, ATOMIC: tl.constexpr):
    """A channel block's share of dB or dC: its own partial row, or added into the shared sum (the order of
    the adds varies between runs: not bitwise deterministic)."""
    if ATOMIC:
        tl.atomic_add(ptrs, vals, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, dlast_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr,
    DIM, L, n_chunks, n_saved,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_Ad, s_An,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, STATE_EVERY: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, WANT_DH0: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
    ATOMIC_BC: tl.constexpr,
):
    """Gradients of one (batch, channel block). du, ddelta, dz: (B, D, L), any strides; fp32 partials
    dA (B, D, N), dD and dbias (B, D), dB and dC (B, n_blocks, N, L), or with ATOMIC_BC dB and dC
    (B, 1, N, L) summed over the channel blocks by atomic adds; dh0 (B, D, N)."""
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(0)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    t = tl.arange(0, CHUNK)
    d_ok, n_ok = d < DIM, n < N
    nd_ok = n_ok[:, None] & d_ok[None, :]
    A = tl.load(A_ptr + n[:, None] * s_An + d[None, :] * s_Ad, mask=nd_ok, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_D else None
    bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
    state_offs = (b * DIM + d[None, :]) * N + n[:, None]
    if HAS_DLAST:
        g = tl.load(dlast_ptr + state_offs, mask=nd_ok, other=0.0)  # d loss / d h at the chunk's end
    else:
        g = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
    dA = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    if HAS_Z:
        z_ptr += b * s_zb
        dz_ptr += b * s_dzb
    dy_ptr += b * s_gb
    B_ptr += b * s_Bb
    C_ptr += b * s_Cb
    du_ptr += b * s_dub
    ddelta_ptr += b * s_ddb
    if ATOMIC_BC:  # (1, N): dB, dC (B, 1, N, L), every channel block adding into them
        part_offs = (b * N + n[None, :]) * L
    else:  # (1, N): dB, dC partials (B, n_blocks, N, L)
        part_offs = ((b * n_blocks + pid_d) * N + n[None, :]) * L
    states_ptr += b * n_saved * DIM * N
    if PREFETCH:  # the next chunk's tiles load while this one computes: latency hidden, registers doubled
        nxt = _bwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dy_ptr, states_ptr, n_chunks - 1, t, d, n, L,
                         d_ok, n_ok, nd_ok, DIM, N, CHUNK, STATE_EVERY,
                         s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, s_gl, s_gd, HAS_Z)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        l = c * CHUNK + t
        if PREFETCH:
            u, raw, raw_next, Bt, Ct, gy, zt, h0 = nxt
            nxt = _bwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dy_ptr, states_ptr, c - 1, t, d, n, L,
                             d_ok, n_ok, nd_ok, DIM, N, CHUNK, STATE_EVERY,
                             s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, s_gl, s_gd, HAS_Z)
        else:
            u, raw, raw_next, Bt, Ct, gy, zt, h0 = _bwd_loads(
                u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dy_ptr, states_ptr, c, t, d, n, L,
                d_ok, n_ok, nd_ok, DIM, N, CHUNK, STATE_EVERY,
                s_ul, s_ud, s_dl, s_dd, s_Bl, s_Bn, s_Cl, s_Cn, s_zl, s_zd, s_gl, s_gd, HAS_Z)
        td_ok = (l < L)[:, None] & d_ok[None, :]
        tn_ok = (l < L)[:, None] & n_ok[None, :]
        u, Bt, Ct, gy = u.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32), gy.to(tl.float32)
        dt, pre = _delta(raw, bias, td_ok, HAS_BIAS, SOFTPLUS, FAST)
        # a_{t+1} = 1 past the end: g_{L-1} = C gy + dlast
        dt_next, _ = _delta(raw_next, bias, (l + 1 < L)[:, None] & d_ok[None, :], HAS_BIAS, SOFTPLUS, FAST)

        # recompute the chunk's states h_t
        dtu = dt * u
        a, hs = tl.associative_scan(
            (_exp2(dt[:, None, :] * A2[None, :, :], FAST), dtu[:, None, :] * Bt[:, :, None]), 0, _combine
        )
        hs += a * h0[None, :, :]
        if HAS_Z:
            zt = zt.to(tl.float32)
            sz = _sigmoid(zt, FAST)
            y = tl.sum(hs * Ct[:, :, None], 1)
            if HAS_D:
                y += u * Dv[None, :]
            dz = gy * y * sz * (1.0 + zt * (1.0 - sz))
            tl.store(dz_ptr + l[:, None] * s_dzl + d[None, :] * s_dzd, dz.to(dz_ptr.dtype.element_ty), mask=td_ok)
            gy *= zt * sz  # now the gradient w.r.t. the ungated output
        if HAS_D:
            du = gy * Dv[None, :]
            dD += tl.sum(gy * u, 0)
        else:
            du = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        _store_bc(dC_ptr + part_offs + l[:, None], tl.sum(hs * gy[:, None, :], 2), tn_ok, ATOMIC_BC)

        # adjoint states g_t = C_t gy_t + a_{t+1} g_{t+1}, right to left, continuing from the chunk to the right:
        # a forward scan of the time-reversed chunk (flips within a thread's registers cost nothing, whereas
        # Triton lowers reverse=True with warp shuffles even along an axis held in-thread)
        a_next = tl.flip(_exp2(dt_next[:, None, :] * A2[None, :, :], FAST), 0)
        gp, gs = tl.associative_scan((a_next, tl.flip(gy[:, None, :] * Ct[:, :, None], 0)), 0, _combine)
        gp, gs = tl.flip(gp, 0), tl.flip(gs, 0)
        gs += gp * g[None, :, :]
        g = _at(gs, t, 0)

        gB = tl.sum(gs * Bt[:, :, None], 1)  # (CHUNK, BLOCK_D)
        du += dt * gB
        _store_bc(dB_ptr + part_offs + l[:, None], tl.sum(gs * dtu[:, None, :], 2), tn_ok, ATOMIC_BC)
        w = gs * (hs - dtu[:, None, :] * Bt[:, :, None])  # d loss / d(delta_t A), (CHUNK, N, BLOCK_D)
        ddt = u * gB + tl.sum(w * A[None, :, :], 1)
        dA += tl.sum(w * dt[:, None, :], 0)
        if SOFTPLUS:
            ddt *= _sigmoid(pre, FAST)
        ddt = tl.where(td_ok, ddt, 0.0)
        dbias += tl.sum(ddt, 0)
        tl.store(du_ptr + l[:, None] * s_dul + d[None, :] * s_dud, du.to(du_ptr.dtype.element_ty), mask=td_ok)
        tl.store(ddelta_ptr + l[:, None] * s_ddl + d[None, :] * s_ddd, ddt.to(ddelta_ptr.dtype.element_ty), mask=td_ok)

    tl.store(dA_ptr + state_offs, dA, mask=nd_ok)
    if HAS_D:
        tl.store(dD_ptr + b * DIM + d, dD, mask=d_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * DIM + d, dbias, mask=d_ok)
    if WANT_DH0:  # d loss / d h_{-1} = a_0 g_0
        dt0, _ = _delta(tl.load(delta_ptr + d[None, :] * s_dd, mask=d_ok[None, :], other=0.0), bias, d_ok[None, :],
                        HAS_BIAS, SOFTPLUS, FAST)
        tl.store(dh0_ptr + state_offs, _exp2(dt0 * A2, FAST) * g, mask=nd_ok)


class ScanTiles(NamedTuple):
    """Tile sizes per pass: CHUNK steps, BLOCK_D channels per program, warps. The forward saves the state
    at each of its chunk starts, so the backward's chunk must be a multiple of the forward's."""

    fwd_chunk: int
    fwd_block_d: int
    fwd_warps: int
    bwd_chunk: int
    bwd_block_d: int
    bwd_warps: int
    bwd_prefetch: bool = True  # load the next chunk while computing this one
    bc_fp32: bool = False  # hand the kernels fp32 copies of B and C (measured no faster, and two more copies)
    # dB, dC summed over the channel blocks by atomic adds instead of written as (B, blocks, N, L) fp32 partials
    # and reduced afterwards (1.2 GB of traffic at the 1.5B shape); the defaults turn it on (measured faster)
    bc_atomic: bool = False


def default_tiles(d_state: int, batch_channels: int) -> ScanTiles:
    """Chunks of 8 steps and one warp a program in both passes: 16 channels per program forward, 8 backward
    (at d_state 16), about 32 fp32 values of each (CHUNK, N, BLOCK_D) tile per thread in the backward. One warp
    keeps every sum over N and over channels inside the warp (shuffles); with two warps the sums over N crossed
    warps through shared memory at every chunk, and the backward took 1.4x as long (benchmarks/RESULTS.md).
    Narrower channel blocks when batch * channels would give under 512 programs (a batch of one long
    sequence). Tiny tiles under the interpreter."""
    if interpreting():
        return ScanTiles(4, 4, 1, 8, 4, 1)
    np2 = triton.next_power_of_2(d_state)
    fwd_block, bwd_block = max(4, 256 // np2), max(4, 128 // np2)
    while fwd_block > 4 and batch_channels // fwd_block < 512:
        fwd_block //= 2
    while bwd_block > 4 and batch_channels // bwd_block < 512:
        bwd_block //= 2
    return ScanTiles(8, fwd_block, 1, 8, bwd_block, 1, bc_atomic=True)


# The last compiled kernel launched per pass ("fwd", "bwd"), for benchmarks to read its registers and spills.
LAUNCHED: dict[str, object] = {}


def empty_like_bdl(t: Tensor) -> Tensor:
    """An empty (B, D, L) tensor laid out (B, L, D) if t is contiguous along D (a view of a (B, L, ·) tensor,
    as the mixer passes them), else (B, D, L): gradients then flow back without a transposing copy."""
    Bsz, D, L = t.shape
    if t.stride(1) == 1 and L > 1:
        return t.new_empty(Bsz, L, D).transpose(1, 2)
    return t.new_empty(Bsz, D, L)


def _strides3(t: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


def scan_forward(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, delta_softplus: bool, initial_state: Tensor | None,
    save_states: bool, tiles: ScanTiles,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """y (u's shape, dtype and layout), the last state (B, D, N) fp32, and if asked the chunk-start
    states (B, L / CHUNK, D, N) fp32 for the backward."""
    Bsz, DIM, L = u.shape
    N = A.shape[1]
    n_chunks = triton.cdiv(L, tiles.fwd_chunk)
    y = empty_like_bdl(u)
    last = u.new_empty(Bsz, DIM, N, dtype=torch.float32)
    states = u.new_empty(Bsz, n_chunks, DIM, N, dtype=torch.float32) if save_states else None
    h0 = None if initial_state is None else initial_state.float().contiguous()
    grid = (triton.cdiv(DIM, tiles.fwd_block_d), Bsz)
    handle = _scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, h0, y, states, last,
        DIM, L, n_chunks,
        *u.stride(), *delta.stride(), *_strides3(z), *y.stride(), *B.stride(), *C.stride(), *A.stride(),
        N=N, NP=triton.next_power_of_2(N), BLOCK_D=tiles.fwd_block_d, CHUNK=tiles.fwd_chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=h0 is not None, SAVE_STATES=save_states, SAVE_LAST=True, FAST=not interpreting(),
        num_warps=tiles.fwd_warps,
    )
    LAUNCHED["fwd"] = handle
    return y, last, states


def scan_backward(
    dy: Tensor, dlast: Tensor | None, states: Tensor,
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, delta_softplus: bool, want_dh0: bool, tiles: ScanTiles,
    dz_out: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias, d initial_state), each in its input's dtype;
    dz is written into dz_out (any strides) when given."""
    Bsz, DIM, L = u.shape
    N = A.shape[1]
    n_blocks = triton.cdiv(DIM, tiles.bwd_block_d)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = empty_like_bdl(u), empty_like_bdl(delta)
    dz = None if z is None else empty_like_bdl(z) if dz_out is None else dz_out
    dA = torch.empty(Bsz, DIM, N, **f32)
    dD = torch.empty(Bsz, DIM, **f32) if D is not None else None
    dbias = torch.empty(Bsz, DIM, **f32) if delta_bias is not None else None
    parts = 1 if tiles.bc_atomic else n_blocks
    alloc = torch.zeros if tiles.bc_atomic else torch.empty
    dB = alloc(Bsz, parts, N, L, **f32)
    dC = alloc(Bsz, parts, N, L, **f32)
    dh0 = torch.empty(Bsz, DIM, N, **f32) if want_dh0 else None
    dlast = None if dlast is None else dlast.float().contiguous()
    handle = _scan_bwd_kernel[(n_blocks, Bsz)](
        u, delta, A, B, C, D, z, delta_bias, dy, dlast, states,
        du, ddelta, dz, dA, dD, dbias, dB, dC, dh0,
        DIM, L, triton.cdiv(L, tiles.bwd_chunk), states.shape[1],
        *u.stride(), *delta.stride(), *_strides3(z), *dy.stride(),
        *du.stride(), *ddelta.stride(), *_strides3(dz),
        *B.stride(), *C.stride(), *A.stride(),
        N=N, NP=triton.next_power_of_2(N), BLOCK_D=tiles.bwd_block_d, CHUNK=tiles.bwd_chunk, STATE_EVERY=tiles.bwd_chunk // tiles.fwd_chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast is not None, WANT_DH0=want_dh0, FAST=not interpreting(), PREFETCH=tiles.bwd_prefetch,
        ATOMIC_BC=tiles.bc_atomic, num_warps=tiles.bwd_warps,
    )
    LAUNCHED["bwd"] = handle
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return (
        du, ddelta, cast(dA.sum(0), A), cast(dB.sum(1) if parts > 1 else dB[:, 0], B),
        cast(dC.sum(1) if parts > 1 else dC[:, 0], C),
        None if D is None else cast(dD.sum(0), D), dz,
        None if delta_bias is None else cast(dbias.sum(0), delta_bias), dh0,
    )


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles):
        ctx.set_materialize_grads(False)
        # B and C are small, (B, N, L): read as they are, or (tiles.bc_fp32) as fp32 copies
        B_in, C_in = (B.float(), C.float()) if tiles.bc_fp32 else (B, C)
        y, last, states = scan_forward(
            u, delta, A, B_in, C_in, D, z, delta_bias, delta_softplus, initial_state, any(ctx.needs_input_grad), tiles
        )
        ctx.save_for_backward(u, delta, A, B_in, C_in, D, z, delta_bias, states)
        ctx.softplus, ctx.tiles, ctx.has_h0, ctx.BC_dtype = delta_softplus, tiles, initial_state is not None, B.dtype
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = scan_backward(
            dy, dlast, states, u, delta, A, B, C, D, z, delta_bias, ctx.softplus,
            ctx.has_h0 and ctx.needs_input_grad[9], ctx.tiles,
        )
        return du, ddelta, dA, dB.to(ctx.BC_dtype), dC.to(ctx.BC_dtype), dD, dz, dbias, None, dh0, None


@torch.compiler.disable  # torch.compile does not trace into Triton autotuners: a graph break
def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    tiles: ScanTiles | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`blocks.scan.selective_scan_ref` on the Triton kernels (fp32 state; bf16, fp16 or fp32 inputs).

    Differentiable in every tensor input, initial_state included. `tiles` overrides `default_tiles`."""
    if u.dtype == torch.float64:
        raise ValueError("selective_scan_triton keeps an fp32 state; use blocks.scan for fp64")
    tiles = tiles or default_tiles(A.shape[1], u.shape[0] * u.shape[1])
    if tiles.bwd_chunk % tiles.fwd_chunk:
        raise ValueError(f"the backward's chunk must be a multiple of the forward's, got {tiles}")
    y, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles)
    return (y, last) if return_last_state else y
