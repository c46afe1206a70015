"""Triton one-token update of the Mamba-1 selective SSM, for decoding; twin of `blocks.scan.selective_state_step`.

    dt = softplus(dt + dt_bias),   h <- exp(dt A) h + dt x B,   y = (C . h + D x) * silu(z)

Shapes: state (B, D, N) fp32, updated in place; x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,).
One program per (batch, BLOCK_D channels) holds its (BLOCK_D, N) block of the state, so the whole step is
one read and one write of the state (92 KB per layer at d_inner 2304) instead of a dozen small kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, DIM,
    s_hb, s_hd, s_hn, s_xb, s_xd, s_tb, s_td, s_Ad, s_An, s_Bb, s_Bn, s_Cb, s_Cn, s_zb, s_zd, s_yb, s_yd,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, A_LOG: tl.constexpr,
):
    """A_LOG: A_ptr holds A_log and A = -exp(A_log) is formed here (decoding reads the parameter as it is)."""
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    d_ok, n_ok = d < DIM, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    h_ptrs = state_ptr + b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn
    h = tl.load(h_ptrs, mask=dn_ok, other=0.0)
    x = tl.load(x_ptr + b * s_xb + d * s_xd, mask=d_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + d * s_td, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=dn_ok, other=0.0).to(tl.float32)
    if A_LOG:
        A = -tl.exp(A)
    Bv = tl.load(B_ptr + b * s_Bb + n * s_Bn, mask=n_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + n * s_Cn, mask=n_ok, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h, mask=dn_ok)
    y = tl.sum(h * Cv[None, :], 1)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + d * s_zd, mask=d_ok, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * s_yb + d * s_yd, y.to(y_ptr.dtype.element_ty), mask=d_ok)


def selective_state_step_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    A_is_log: bool = False,
) -> Tensor:
    """Same arguments and result as `blocks.scan.selective_state_step`: state advanced in place, y (B, D) in x's dtype.
    A_is_log: A is A_log and the kernel forms A = -exp(A_log) (no launches for it in a decoding step)."""
    if state.dtype != torch.float32:
        raise ValueError(f"the SSM state must be fp32, got {state.dtype}")
    Bsz, DIM, N = state.shape
    y = torch.empty_like(x)
    block_d = 4 if interpreting() else 64
    zs = (0, 0) if z is None else z.stride()
    _ssm_step_kernel[(triton.cdiv(DIM, block_d), Bsz)](
        state, x, dt, A, B, C, D, z, dt_bias, y, DIM,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *y.stride(),
        N=N, NP=triton.next_power_of_2(N), BLOCK_D=block_d,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        A_LOG=A_is_log,
    )
    return y
