"""The MoE experts on the GPU: permutation, gather-GEMM, GLU, GEMM-scatter, and their backward.

Same function as blocks.moe.moe_experts_ref (its PyTorch twin), computed as
    order, offsets = permute_slots(ids)              counting sort of the slots by expert
    h, act = gmm_glu(x, W1, gather rows token[p])   (P, 2F) and act = glu(h) (P, F) in one pass,
                                                     no gathered copy of x
    y[slot[p]] = w_p * gmm(act, W2)                  written straight to slot order, weighted
    out = y.view(T, K, D).sum(1)                     (a view for top-1)
Backward: da = gmm(dout, W2^T, gather token[p]); dh, the gate-weight gradients and the gathered
w * dout[token] in one GLU pass; dW2 = act^T (w * dout[token]); dx via gmm(dh, W1^T) scattered to slot order; dW1 = x[token]^T dh.
Shapes: T tokens, K slots per token, S = T*K slots, P <= S sorted active rows, D width, F hidden.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blocks.kernels.glu import glu_bwd
from blocks.kernels.grouped_gemm import gmm, gmm_glu, gmm_wgrad
from blocks.kernels.permute import permute_slots


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_in, w_out, order_P, offsets_E1, num_rows, has_mask, activation, compute_dtype):
        T, D = x_TD.shape
        K = weights_TK.shape[1]
        token_P = torch.div(order_P, K, rounding_mode="floor")
        w_P = weights_TK.reshape(-1).float()[order_P]
        w1, w2 = w_in.to(compute_dtype), w_out.to(compute_dtype)
        h_PF2, act_PF = gmm_glu(x_TD, w1, offsets_E1, num_rows, activation, a_rows=token_P)
        # masked slots are never written: start from zeros then
        y_SD = (torch.zeros if has_mask else torch.empty)(T * K, D, dtype=x_TD.dtype, device=x_TD.device)
        gmm(act_PF, w2, offsets_E1, num_rows, out=y_SD, y_rows=order_P, scale=w_P)
        ctx.save_for_backward(x_TD, w1, w2, order_P, token_P, offsets_E1, w_P, h_PF2, act_PF)
        ctx.meta = (T, K, num_rows, has_mask, activation, compute_dtype, w_in.dtype, w_out.dtype, weights_TK.dtype)
        out_TD = y_SD.view(T, K, D).sum(1, dtype=torch.float32).to(x_TD.dtype) if K > 1 else y_SD
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, w1, w2, order_P, token_P, offsets_E1, w_P, h_PF2, act_PF = ctx.saved_tensors
        T, K, num_rows, has_mask, activation, compute_dtype, w_in_dtype, w_out_dtype, weights_dtype = ctx.meta
        dout_TD = dout_TD.contiguous()
        D = x_TD.shape[1]
        da_PF = gmm(dout_TD, w2.transpose(1, 2), offsets_E1, num_rows, a_rows=token_P)
        dw_S = torch.zeros(T * K, dtype=torch.float32, device=x_TD.device)
        dh_PF2, wdout_PD = glu_bwd(h_PF2, da_PF, w_P, order_P, dw_S, offsets_E1, activation, dout_TD, token_P)
        dw_out = gmm_wgrad(act_PF, wdout_PD, offsets_E1, compute_dtype=compute_dtype, dtype=w_out_dtype)
        dx_SD = (torch.zeros if has_mask else torch.empty)(T * K, D, dtype=x_TD.dtype, device=x_TD.device)
        gmm(dh_PF2, w1.transpose(1, 2), offsets_E1, num_rows, out=dx_SD, y_rows=order_P)
        dx_TD = dx_SD.view(T, K, D).sum(1, dtype=torch.float32).to(x_TD.dtype) if K > 1 else dx_SD
        dw_in = gmm_wgrad(x_TD, dh_PF2, offsets_E1, a_rows=token_P, compute_dtype=compute_dtype, dtype=w_in_dtype)
        dweights = dw_S.view(T, K).to(weights_dtype)
        return dx_TD, dweights, dw_in, dw_out, None, None, None, None, None, None


@torch.compiler.disable  # torch.compile does not trace into Triton autotuners: a graph break
def moe_experts_triton(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    mask_TK: Tensor | None,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    *,
    max_active_slots: int | None = None,
) -> Tensor:
    """Fused-kernel twin of blocks.moe.moe_experts_ref (same arguments, same result and gradients).

    max_active_slots: a bound on the slots that are not masked, known to the caller (expert-choice
    routing keeps E * capacity of T * E slots), so buffers are sized to it; None: all T * K slots.
    The GEMMs run in the autocast dtype when autocast is on, else in x's dtype."""
    T, D = x_TD.shape
    K = expert_ids_TK.shape[1]
    E = w_in.shape[0]
    device_type = x_TD.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_TD.dtype
    order_P, offsets_E1 = permute_slots(expert_ids_TK, E, mask_TK)
    num_rows = T * K if max_active_slots is None else min(T * K, max_active_slots)
    # x in the compute dtype once, here, rather than loaded in fp32 by every GEMM that reads it: under bf16-mixed
    # the norm before the MoE hands over fp32, and reading it twice as wide slowed the forward GEMM and dW_in
    # (which gather it row by row) by about a third. The same operands as autocast gives the reference's matmuls.
    x_TD = x_TD.to(compute_dtype).contiguous()
    with torch.autocast(device_type=device_type, enabled=False):
        return _MoEExperts.apply(
            x_TD, weights_TK, w_in, w_out, order_P, offsets_E1, num_rows, mask_TK is not None,
            activation, compute_dtype,
        )
