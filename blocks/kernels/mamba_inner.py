"""The Mamba mixer between in_proj and out_proj as one autograd function, for training on the Triton kernels.

    x, z = xz (its two halves);  x_c = SiLU(conv(x));  (dt_low, B, C) = x_c W_x^T;  dt = dt_low W_dt^T
    y = selective_scan(x_c, dt, A = -exp(A_log), B, C, D, z, dt_bias, softplus)

Composed by autograd, the same ops cost extra passes over (B, L, E)-sized tensors in the backward: the
gradients of x and z are concatenated into in_proj's gradient (a copy of (B, L, 2E)), and x_c's two gradients
(from the scan, and from x_proj) are added. Here the conv and the scan write dx and dz straight into the two
halves of one (B, L, 2E) buffer, and x_proj's data gradient is accumulated into the scan's du by the GEMM
itself (addmm with beta 1). The math is blocks.mamba.Mamba's forward; the tests compare values and every
gradient with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.kernels.causal_conv1d import conv_backward, conv_forward
from blocks.kernels import selective_scan
from blocks.kernels.selective_scan import ScanTiles, scan_backward, scan_forward


def _split(xz: Tensor, dbc: Tensor, R: int, N: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, z) as (B, E, L) views of xz (B, L, 2E), and (B, C) as (B, N, L) views of dbc (B, L, R + 2N)."""
    E = xz.shape[-1] // 2
    return (xz[..., :E].transpose(1, 2), xz[..., E:].transpose(1, 2),
            dbc[..., R:R + N].transpose(1, 2), dbc[..., R + N:].transpose(1, 2))


class _MambaInner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, R, N, tiles):
        E = xz.shape[-1] // 2
        # the projections in xz's dtype: under autocast (bf16-mixed) in_proj's output is bf16 and the weights
        # fp32, and the backward, which runs outside autocast, must multiply the same operands
        x_proj_w, dt_proj_w = x_proj_w.to(xz.dtype), dt_proj_w.to(xz.dtype)
        xc = conv_forward(xz[..., :E].transpose(1, 2), conv_w, conv_b, True)  # (B, E, L), laid out (B, L, E)
        dbc = F.linear(xc.transpose(1, 2), x_proj_w)  # (B, L, R + 2N)
        dt = F.linear(dbc[..., :R], dt_proj_w)  # (B, L, E): the bias and softplus are applied in the scan
        _, z, B, C = _split(xz, dbc, R, N)
        A = -torch.exp(A_log.float())
        save = any(ctx.needs_input_grad)  # the chunk-start states only when a backward can follow
        y, _, states = scan_forward(xc, dt.transpose(1, 2), A, B, C, D, z, dt_bias, True, None, save, tiles)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, xc, dbc, dt, states)
        ctx.R, ctx.N, ctx.tiles = R, N, tiles
        return y.transpose(1, 2)  # (B, L, E), contiguous

    @staticmethod
    def backward(ctx, dy):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, xc, dbc, dt, states = ctx.saved_tensors
        R, N = ctx.R, ctx.N
        E = xz.shape[-1] // 2
        x, z, B, C = _split(xz, dbc, R, N)
        A = -torch.exp(A_log.float())
        dxz = torch.empty_like(xz)
        du, ddt, dA, dB, dC, dD, _, dbias, _ = scan_backward(
            dy.transpose(1, 2), None, states, xc, dt.transpose(1, 2), A, B, C, D, z, dt_bias, True, False,
            ctx.tiles, dz_out=dxz[..., E:].transpose(1, 2),
        )
        # du and ddt are (B, E, L) views of (B, L, E) tensors: as (B L, E) matrices they are views too
        ddt_2d, du_2d = ddt.transpose(1, 2).reshape(-1, E), du.transpose(1, 2).reshape(-1, E)
        dbc_2d = dbc.view(-1, R + 2 * N)
        ddbc = torch.empty_like(dbc)
        ddbc[..., :R] = (ddt_2d @ dt_proj_w).view(*dbc.shape[:2], R)
        ddbc[..., R:R + N] = dB.transpose(1, 2)
        ddbc[..., R + N:] = dC.transpose(1, 2)
        ddbc_2d = ddbc.view(-1, R + 2 * N)
        # weight gradients in xz's dtype; autograd casts them to the parameters' dtype
        d_dt_proj_w = ddt_2d.T @ dbc_2d[:, :R]
        d_x_proj_w = ddbc_2d.T @ xc.transpose(1, 2).reshape(-1, E)
        du_2d.addmm_(ddbc_2d, x_proj_w)  # x_c's gradient through x_proj, added by the GEMM itself
        _, d_conv_w, d_conv_b = conv_backward(du, x, conv_w, conv_b, True, dx=dxz[..., :E].transpose(1, 2))
        dA_log = (dA.float() * A).to(A_log.dtype)  # A = -exp(A_log): dA_log = dA * A
        return dxz, d_conv_w, d_conv_b, d_x_proj_w, d_dt_proj_w, dbias, dA_log, dD, None, None, None


@torch.compiler.disable  # torch.compile does not trace into Triton kernels launched from autograd functions
def mamba_inner_triton(
    xz: Tensor, conv_w: Tensor, conv_b: Tensor | None, x_proj_w: Tensor, dt_proj_w: Tensor, dt_bias: Tensor,
    A_log: Tensor, D: Tensor, tiles: ScanTiles | None = None,
) -> Tensor:
    """y (B, L, E) from in_proj's output xz (B, L, 2E); conv_w (E, K), x_proj_w (R + 2N, E), dt_proj_w (E, R),
    A_log (E, N). Differentiable in every tensor argument."""
    E, N = A_log.shape
    R = dt_proj_w.shape[1]
    if xz.dim() != 3 or xz.shape[-1] != 2 * E or x_proj_w.shape != (R + 2 * N, E):
        raise ValueError(f"mamba_inner_triton: inconsistent shapes xz {tuple(xz.shape)}, x_proj "
                         f"{tuple(x_proj_w.shape)}, dt_proj {tuple(dt_proj_w.shape)}, A_log {tuple(A_log.shape)}")
    tiles = tiles or selective_scan.default_tiles(N, xz.shape[0] * E)  # looked up here: benchmarks patch it
    return _MambaInner.apply(xz.contiguous(), conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, R, N, tiles)
