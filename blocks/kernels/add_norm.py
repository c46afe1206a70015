"""The residual stream's add and the next block's RMSNorm as one pass, forward and backward.

Between two pre-norm blocks the model computes r' = r + out (the fp32 residual stream plus the block's bf16
output) and h = RMSNorm(r') w, which the next block reads in the compute dtype. Composed from PyTorch ops
under bf16 autocast that is four passes over (N, D) tensors forward (out in fp32, the add, the norm, h in
bf16) and more backward (the norm's input and weight gradients, the cast back, the sum of the two
gradients of r'). Here, per row of D:

    forward    r' = r + out;  rstd = (mean(r'^2) + eps)^(-1/2);  h = (r' rstd) w     (r', h, rstd stored)
    backward   g = dh w;  dr = dr' + rstd (g - x c),  x = r' rstd,  c = mean(g x);  d out = dr;
               dw = sum over rows of dh x (each program sums its rows; the programs' sums are added after)

All arithmetic is fp32; h is stored in the dtype asked for. Without `out` (the first block) r' is r and only
h is formed. The twin, add_rms_norm_torch, is the same function from PyTorch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting


@triton.jit
def _add_norm_fwd_kernel(
    r_ptr, out_ptr, w_ptr, r_new_ptr, h_ptr, rstd_ptr, D, eps, HAS_OUT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * D
    ds = tl.arange(0, BLOCK_D)
    ok = ds < D
    r = tl.load(r_ptr + row + ds, mask=ok, other=0.0).to(tl.float32)
    if HAS_OUT:
        r += tl.load(out_ptr + row + ds, mask=ok, other=0.0).to(tl.float32)
        tl.store(r_new_ptr + row + ds, r, mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / D + eps)
    w = tl.load(w_ptr + ds, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + row + ds, (r * rstd * w).to(h_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + tl.program_id(0), rstd)


@triton.jit
def _add_norm_bwd_kernel(
    dh_ptr, dr_new_ptr, r_ptr, w_ptr, rstd_ptr, dr_ptr, dout_ptr, dw_ptr, N, D, rows,
    HAS_DR_NEW: tl.constexpr, HAS_DOUT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0)
    ds = tl.arange(0, BLOCK_D)
    ok = ds < D
    w = tl.load(w_ptr + ds, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, rows):
        n = p * rows + i
        if n < N:
            off = n.to(tl.int64) * D + ds
            x = tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + n)
            x = x * rstd
            dh = tl.load(dh_ptr + off, mask=ok, other=0.0).to(tl.float32)
            g = dh * w
            dr = rstd * (g - x * (tl.sum(g * x, axis=0) / D))
            if HAS_DR_NEW:
                dr += tl.load(dr_new_ptr + off, mask=ok, other=0.0).to(tl.float32)
            tl.store(dr_ptr + off, dr, mask=ok)
            if HAS_DOUT:
                tl.store(dout_ptr + off, dr.to(dout_ptr.dtype.element_ty), mask=ok)
            dw += dh * x
    tl.store(dw_ptr + p.to(tl.int64) * D + ds, dw, mask=ok)


def _launch(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return block_d, 1 if interpreting() else min(8, max(1, block_d // 256))


def _bwd_programs(N: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; each sums the weight gradient of its rows."""
    if interpreting() or device.type != "cuda":
        return min(N, 3)
    return min(N, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def _forward(r_ND: Tensor, out_ND: Tensor | None, w_D: Tensor, eps: float, h_dtype: torch.dtype):
    N, D = r_ND.shape
    has_out = out_ND is not None
    r_new = torch.empty_like(r_ND) if has_out else r_ND
    h = torch.empty(N, D, device=r_ND.device, dtype=h_dtype)
    rstd = torch.empty(N, device=r_ND.device, dtype=torch.float32)
    block_d, warps = _launch(D)
    _add_norm_fwd_kernel[(N,)](
        r_ND, out_ND if has_out else r_ND, w_D, r_new, h, rstd, D, eps, has_out, block_d, num_warps=warps,
    )
    return r_new, h, rstd


def _backward(r_new: Tensor, w_D: Tensor, rstd: Tensor, dh: Tensor, dr_new: Tensor | None, out_dtype):
    """(dr, d out or None, dw)."""
    N, D = r_new.shape
    dr = torch.empty_like(r_new)
    dout = None if out_dtype is None else torch.empty(N, D, device=r_new.device, dtype=out_dtype)
    programs = _bwd_programs(N, r_new.device)
    dw_part = torch.empty(programs, D, device=r_new.device, dtype=torch.float32)
    block_d, warps = _launch(D)
    _add_norm_bwd_kernel[(programs,)](
        dh.contiguous(), dh if dr_new is None else dr_new.contiguous(), r_new, w_D, rstd, dr,
        dr if dout is None else dout, dw_part, N, D, triton.cdiv(N, programs), dr_new is not None,
        dout is not None, block_d, num_warps=warps,
    )
    return dr, dout, dw_part.sum(0).to(w_D.dtype)


class _RMSNorm(torch.autograd.Function):
    """h = RMSNorm(r) w (the first block: nothing to add yet)."""

    @staticmethod
    def forward(ctx, r_ND: Tensor, w_D: Tensor, eps: float, h_dtype: torch.dtype) -> Tensor:
        _, h, rstd = _forward(r_ND, None, w_D, eps, h_dtype)
        ctx.save_for_backward(r_ND, w_D, rstd)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        dr, _, dw = _backward(*ctx.saved_tensors, dh, None, None)
        return dr, dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    """(r' = r + out, h = RMSNorm(r') w)."""

    @staticmethod
    def forward(ctx, r_ND: Tensor, out_ND: Tensor, w_D: Tensor, eps: float, h_dtype: torch.dtype):
        r_new, h, rstd = _forward(r_ND, out_ND, w_D, eps, h_dtype)
        ctx.save_for_backward(r_new, w_D, rstd)
        ctx.out_dtype = out_ND.dtype
        return r_new, h

    @staticmethod
    def backward(ctx, dr_new: Tensor | None, dh: Tensor):
        dr, dout, dw = _backward(*ctx.saved_tensors, dh, dr_new, ctx.out_dtype)
        return dr, dout, dw, None, None


def rms_eps(norm: torch.nn.RMSNorm) -> float:
    """The eps an nn.RMSNorm applies: its own, or (None) that of its input's dtype, which the blocks make the
    weight's dtype."""
    return norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps


@torch.compiler.disable  # torch.compile does not trace into Triton kernels launched from autograd functions
def add_rms_norm_triton(
    r: Tensor, out: Tensor | None, weight: Tensor, eps: float, h_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(r + out in fp32, RMSNorm(r + out) * weight in h_dtype) for r (..., D) fp32 and out (..., D) of any float
    dtype or None (then the first element is r itself). Differentiable in r, out and weight."""
    D = r.shape[-1]
    if r.dtype != torch.float32 or weight.shape != (D,) or (out is not None and out.shape != r.shape):
        raise ValueError(f"add_rms_norm: fp32 residual (..., D) and weight (D,) expected, got {r.dtype} "
                         f"{tuple(r.shape)}, weight {tuple(weight.shape)}, out {None if out is None else tuple(out.shape)}")
    if out is None:
        return r, _RMSNorm.apply(r.contiguous().view(-1, D), weight, eps, h_dtype).view(r.shape)
    r_new, h = _AddRMSNorm.apply(r.contiguous().view(-1, D), out.contiguous().view(-1, D), weight, eps, h_dtype)
    return r_new.view(r.shape), h.view(r.shape)


def add_rms_norm_torch(
    r: Tensor, out: Tensor | None, weight: Tensor, eps: float, h_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The twin, from PyTorch ops."""
    if out is not None:
        r = r + out.float()
    return r, F.rms_norm(r, (r.shape[-1],), weight.float(), eps).to(h_dtype)
