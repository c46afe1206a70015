"""The Mamba-1 selective scan (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2) in pure PyTorch.

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t      (ZOH for A, Euler for B, as Mamba-1)
    y_t = C_t . h_t + D u_t,   then   y_t = y_t * silu(z_t)

Shapes: B batch, D channels (d_inner), N state size (d_state), L sequence length, T chunk length.
Inputs follow mamba-ssm: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,).
The state is kept in fp32 (fp64 for fp64 inputs); outputs come back in u's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference: one recurrence step per token. Slow; the ground truth for tests."""
    f = _state_dtype(u.dtype)
    u_BDL = u.to(f)
    delta_BDL = _prepare_delta(delta, delta_bias, delta_softplus, f)
    dA_LBDN = torch.exp(torch.einsum("bdl,dn->lbdn", delta_BDL, A.to(f)))
    dBu_LBDN = torch.einsum("bdl,bnl->lbdn", delta_BDL * u_BDL, B.to(f))
    h_BDN = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=f) if initial_state is None else initial_state.to(f)
    ys = []
    # unbind (not indexing) so that autograd's backward is a stack, not L scatters into zeros
    for dA_BDN, dBu_BDN, C_BN in zip(dA_LBDN.unbind(0), dBu_LBDN.unbind(0), C.to(f).unbind(-1)):
        h_BDN = dA_BDN * h_BDN + dBu_BDN
        ys.append(torch.einsum("bdn,bn->bd", h_BDN, C_BN))
    y_BDL = _finish(torch.stack(ys, dim=-1), u_BDL, D, z, u.dtype)
    return (y_BDL, h_BDN) if return_last_state else y_BDL


def _scan_(a: Tensor, b: Tensor, reverse: bool = False) -> None:
    """In place, b becomes the running state of h_t = a_t h_{t-1} + b_t along dim 1 (from h = 0).

    Sklansky's parallel prefix: at level s, the second half of every block of 2s steps adds
    (product of its own a's) * (state at the end of the first half). Only products of decays
    in (0, 1] are formed, so nothing can overflow. With reverse=True it runs right to left,
    h_t = a_t h_{t+1} + b_t, for the adjoint in the backward pass. dim 1 must be a power of two.
    a is overwritten with cumulative products, except at the first (last if reverse) step.
    """
    T = a.shape[1]
    src, dst, edge = (1, 0, slice(0, 1)) if reverse else (0, 1, slice(-1, None))
    s = 1
    while s < T:
        a_v = a.unflatten(1, (T // (2 * s), 2, s))
        b_v = b.unflatten(1, (T // (2 * s), 2, s))
        b_v[:, :, dst].addcmul_(a_v[:, :, dst], b_v[:, :, src, edge])
        if 2 * s < T:  # the last level's products are never read
            a_v[:, :, dst].mul_(a_v[:, :, src, edge])
        s *= 2


def _decays(delta_BTD: Tensor, A_DN: Tensor) -> Tensor:
    """a_t = exp(delta_t A), (B, T, D, N); in (0, 1] for A <= 0."""
    return (delta_BTD[..., None] * A_DN).exp_()


def _chunk_states(a_BTDN: Tensor, x_BTD: Tensor, B_BTN: Tensor, h0_BDN: Tensor) -> Tensor:
    """All states h_t of one chunk, (B, T, D, N), continuing from h0. Overwrites a (but not a[:, 0])."""
    h_BTDN = x_BTD[..., None] * B_BTN[:, :, None, :]
    h_BTDN[:, 0].addcmul_(a_BTDN[:, 0], h0_BDN)
    _scan_(a_BTDN, h_BTDN)
    return h_BTDN


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + x_t B_t, on (B, L, ·) inputs, L a multiple of T.

    Memory-lean: keeps only the inputs and the state at each chunk start; the backward pass
    recomputes a chunk's states and runs the adjoint recurrence
        g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}
    with the same parallel scan, right to left.
    """

    @staticmethod
    def forward(ctx, delta_BLD, x_BLD, A_DN, B_BLN, C_BLN, h0_BDN, T):
        Bsz, L, D = x_BLD.shape
        starts_CBDN = x_BLD.new_empty(L // T, Bsz, D, A_DN.shape[1])
        y_BLD = torch.empty_like(x_BLD)
        h_BDN = h0_BDN
        for c in range(L // T):
            t = slice(c * T, (c + 1) * T)
            starts_CBDN[c] = h_BDN
            h_BTDN = _chunk_states(_decays(delta_BLD[:, t], A_DN), x_BLD[:, t], B_BLN[:, t], h_BDN)
            y_BLD[:, t] = (h_BTDN @ C_BLN[:, t, :, None])[..., 0]
            h_BDN = h_BTDN[:, -1].clone()
        ctx.T = T
        ctx.save_for_backward(delta_BLD, x_BLD, A_DN, B_BLN, C_BLN, starts_CBDN)
        return y_BLD, h_BDN

    @staticmethod
    @once_differentiable
    def backward(ctx, gy_BLD, ghT_BDN):
        delta_BLD, x_BLD, A_DN, B_BLN, C_BLN, starts_CBDN = ctx.saved_tensors
        T = ctx.T
        g_delta, g_x, g_B, g_C = (torch.empty_like(t) for t in (delta_BLD, x_BLD, B_BLN, C_BLN))
        g_A = torch.zeros_like(A_DN)
        # gradient w.r.t. the state at the end of the current chunk, flowing right to left
        g_BDN = ghT_BDN
        for c in reversed(range(starts_CBDN.shape[0])):
            t = slice(c * T, (c + 1) * T)
            delta_BTD, x_BTD, gy_BTD = delta_BLD[:, t], x_BLD[:, t], gy_BLD[:, t]
            B_BTN, C_BTN = B_BLN[:, t], C_BLN[:, t]
            a_BTDN = _decays(delta_BTD, A_DN)
            a_next_BTDN = torch.empty_like(a_BTDN)  # a_{t+1}, copied before the scan overwrites a
            a_next_BTDN[:, :-1] = a_BTDN[:, 1:]
            a_next_BTDN[:, -1] = 1.0
            h_BTDN = _chunk_states(a_BTDN, x_BTD, B_BTN, starts_CBDN[c])
            g_C[:, t] = (h_BTDN.transpose(-1, -2) @ gy_BTD[..., None])[..., 0]
            # adjoint states: gh_t = C_t gy_t + a_{t+1} gh_{t+1}, seeded with g at the chunk end
            gh_BTDN = gy_BTD[..., None] * C_BTN[:, :, None, :]
            gh_BTDN[:, -1] += g_BDN
            _scan_(a_next_BTDN, gh_BTDN, reverse=True)
            g_x[:, t] = (gh_BTDN @ B_BTN[..., None])[..., 0]
            g_B[:, t] = (gh_BTDN.transpose(-1, -2) @ x_BTD[..., None])[..., 0]
            # d loss / d(delta_t A) = gh_t * a_t h_{t-1} = gh_t * (h_t - x_t B_t)
            g_la_BTDN = h_BTDN.addcmul_(x_BTD[..., None], B_BTN[:, :, None, :], value=-1).mul_(gh_BTDN)
            g_A += torch.einsum("btdn,btd->dn", g_la_BTDN, delta_BTD)
            g_delta[:, t] = (g_la_BTDN.mul_(A_DN)).sum(-1)
            g_BDN = a_BTDN[:, 0] * gh_BTDN[:, 0]
        return g_delta, g_x, g_A, g_B, g_C, g_BDN, None


def selective_scan_chunked(
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
    chunk_size: int = 16,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same result as `selective_scan_ref`, parallel within chunks of `chunk_size` (a power of two)
    steps, with the state carried from chunk to chunk. Differentiable, through a hand-written
    backward that recomputes each chunk rather than storing all (B, D, N, L) states.

    On 2 CPU cores (B=8, D=512, N=16, L=512, fp32) chunk sizes 8-32 are about equally fast,
    ~4x (forward) and ~3x (forward + backward) faster than the reference, at a third of its memory.
    """
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    f = _state_dtype(u.dtype)
    Bsz, D_inner, L = u.shape
    T = min(chunk_size, 1 << max(L - 1, 0).bit_length())  # short inputs need no full chunk
    pad = -L % T
    u_BDL = u.to(f)
    delta_BDL = _prepare_delta(delta, delta_bias, delta_softplus, f)
    # (B, L, ·) layout: a chunk's states are then (B, T, D, N) and its C-contraction a matmul.
    # Padding with delta = 0, x = 0 is the identity step (a = 1, b = 0), so the last state is unchanged.
    delta_BLD = F.pad(delta_BDL.transpose(1, 2), (0, 0, 0, pad)).contiguous()
    x_BLD = F.pad((delta_BDL * u_BDL).transpose(1, 2), (0, 0, 0, pad)).contiguous()
    B_BLN = F.pad(B.to(f).transpose(1, 2), (0, 0, 0, pad)).contiguous()
    C_BLN = F.pad(C.to(f).transpose(1, 2), (0, 0, 0, pad)).contiguous()
    h0_BDN = u.new_zeros(Bsz, D_inner, A.shape[1], dtype=f) if initial_state is None else initial_state.to(f)
    y_BLD, h_BDN = _ChunkedScan.apply(delta_BLD, x_BLD, A.to(f), B_BLN, C_BLN, h0_BDN, T)
    y_BDL = _finish(y_BLD[:, :L].transpose(1, 2), u_BDL, D, z, u.dtype)
    return (y_BDL, h_BDN) if return_last_state else y_BDL


def selective_state_step(
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
) -> Tensor:
    """One decoding step: state (B, D, N) is advanced in place; x, dt, z (B, D); B, C (B, N).

    Returns y (B, D) in x's dtype.
    """
    f = state.dtype
    # as (B, D, 1): a length-1 sequence, so the helpers shared with the scans apply unchanged
    dt_BD1 = _prepare_delta(dt[..., None], dt_bias, dt_softplus, f)
    x_BD1 = x[..., None].to(f)
    state.mul_(torch.exp(dt_BD1 * A.to(f))).add_((dt_BD1 * x_BD1) * B.to(f)[:, None, :])
    y_BD1 = torch.einsum("bdn,bn->bd", state, C.to(f))[..., None]
    return _finish(y_BD1, x_BD1, D, None if z is None else z[..., None], x.dtype)[..., 0]
