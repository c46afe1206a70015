"""The MoE layer's decoding path: its function for the few tokens of one step, with no host synchronisation.

MoE.forward groups tokens by expert (a sort, group sizes): right for thousands of tokens, but the grouped
kernels size nothing without the counts, and the PyTorch reference reads them back. Decoding has one token
per sequence, is bound by reading weights, and must be capturable in a CUDA graph (LM.step), so here:

- fewer slots than experts (batch 1): only the chosen experts are read: on CUDA by the routed-expert
  kernels of blocks/kernels/decode.py (one program per slot and output block, nothing is read back),
  elsewhere by gathering each slot's expert weights and one bmm per projection;
- otherwise: every expert runs on every token and the gate weights, zero for experts a token did not
  choose, scale the GLU outputs before one down projection over all experts' features: each expert's
  weights are read once, and no shape depends on the routing (in the fused CUDA step, blocks.fused_step,
  `add_dense_experts_` does the GLU and the scaling in one kernel).

Shapes: T tokens, D width, E experts, K slots per token, S = T*K slots, F expert hidden width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.kernels import use_triton
from blocks.mlp import glu_activation
from blocks.moe import MoE


def route(moe: MoE, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
    """(expert ids (T, K), fp32 gate weights (T, K)) by the router's current rule; empty slots weigh 0."""
    routing = moe.router(logits_TE)
    weights_TK = routing.weights_TK.float()
    if routing.mask_TK is not None:  # an empty slot (expert-choice in training) contributes nothing
        weights_TK = weights_TK * routing.mask_TK
    return routing.expert_ids_TK, weights_TK


def add_routed_experts_(out_TD: Tensor, moe: MoE, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """out += sum_k weights[t, k] * expert_{ids[t, k]}(x_t), fp32 out in place, through the decoding kernels
    (CUDA, or Triton's interpreter), which read only the routed experts' weights. Returns out."""
    from blocks.kernels.decode import (  # imports Triton: Linux only
        expert_down_residual_,
        expert_glu_up,
    )

    a_SF = expert_glu_up(x_TD, ids_TK, moe.w_in.to(x_TD.dtype), moe.cfg.activation)
    return expert_down_residual_(out_TD, a_SF, ids_TK, weights_TK, moe.w_out.to(x_TD.dtype))


def gated_glu_torch(up_ETH: Tensor, ids_TK: Tensor, weights_TK: Tensor, activation: str) -> Tensor:
    """a (T, E*F) in up's dtype: a[t, e*F + f] = g_te * glu(up[e, t])_f, g_te the gate weight of the token's
    slot that chose expert e (0 if none did); up_ETH (E, T, 2F). The twin of blocks.kernels.decode.gated_glu."""
    E, T, _ = up_ETH.shape
    gate_TE = torch.zeros(T, E, device=up_ETH.device).scatter_add_(1, ids_TK, weights_TK.float())
    a_ETF = glu_activation(activation)(up_ETH.float()) * gate_TE.T[..., None]
    return a_ETF.transpose(0, 1).reshape(T, -1).to(up_ETH.dtype)


def add_dense_experts_(out_TD: Tensor, moe: MoE, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """out += sum_k weights[t, k] * expert_{ids[t, k]}(x_t), fp32 out in place, with every expert run on every
    token (one slot per expert or more): one bmm for all experts' input projections, one kernel for the GLU and
    the gate scaling (blocks.kernels.decode.gated_glu), one matmul for all down projections and their sum.
    CUDA or Triton's interpreter. Returns out."""
    from blocks.kernels.decode import gated_glu  # imports Triton: Linux only

    T, D = x_TD.shape
    E = moe.num_experts
    up_ETH = torch.bmm(x_TD.expand(E, T, D), moe.w_in.to(x_TD.dtype))
    a_TX = gated_glu(up_ETH, ids_TK, weights_TK, moe.cfg.activation)
    return addmm_fp32_(out_TD, a_TX, moe.w_out.to(x_TD.dtype).reshape(-1, D))


def addmm_fp32_(out_MN: Tensor, a_MK: Tensor, b_KN: Tensor) -> Tensor:
    """out += a @ b for an fp32 out: on CUDA with bf16/fp16 operands one cuBLAS GEMM that accumulates into out
    (no product tensor, no separate add); elsewhere the product, then the add. Returns out."""
    if out_MN.is_cuda and a_MK.dtype in (torch.bfloat16, torch.float16):
        return torch.addmm(out_MN, a_MK, b_KN, torch.float32, out=out_MN)
    return out_MN.add_(a_MK @ b_KN)


def moe_step(moe: MoE, x_TD: Tensor, logits_TE: Tensor | None = None) -> Tensor:
    """moe's output (T, D) for x_TD: forward's function (dropless, the router's current rule), combined in
    fp32 and returned in x's dtype. No utilization counter is updated. logits_TE: the router logits when the
    caller has formed them already (blocks.fused_step), else they are computed here in fp32."""
    T, D = x_TD.shape
    E = moe.num_experts
    if logits_TE is None:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), moe.gate.weight.float(), moe.gate.bias.float())
    ids_TK, weights_TK = route(moe, logits_TE)
    act = glu_activation(moe.cfg.activation)
    w_in, w_out = moe.w_in.to(x_TD.dtype), moe.w_out.to(x_TD.dtype)
    K = ids_TK.shape[1]
    if T * K < E and use_triton(x_TD):
        # the decoding kernels read the chosen experts' weights in place, where the gather below copies them
        # first (25 us per copy at the 1.5B width on an H200)
        y_TD = add_routed_experts_(x_TD.new_zeros(T, D, dtype=torch.float32), moe, x_TD, ids_TK, weights_TK)
    elif T * K < E:
        ids_S = ids_TK.reshape(-1)
        x_S1D = x_TD[:, None].expand(T, K, D).reshape(T * K, 1, D)
        y_SD = torch.bmm(act(torch.bmm(x_S1D, w_in[ids_S])), w_out[ids_S])[:, 0]
        y_TD = (y_SD.float().view(T, K, D) * weights_TK[..., None]).sum(1)
    else:
        # the gate weights (zero where a token did not choose the expert) scale the GLU outputs, so that all
        # experts' down projections and their weighted sum are one matmul over the E*F concatenated features
        a_TX = gated_glu_torch(torch.bmm(x_TD.expand(E, T, D), w_in), ids_TK, weights_TK, moe.cfg.activation)
        y_TD = (a_TX @ w_out.reshape(-1, D)).float()
    y_TD = y_TD.to(x_TD.dtype)
    if moe.shared is not None:
        y_TD = y_TD + moe.shared(x_TD)
    return y_TD
