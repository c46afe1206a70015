"""LM.step on CUDA: the one-token step with the decoding kernels of blocks/kernels/decode.py.

A batch-1 step of the 1.5B preset through the modules' own `step`s runs ~575 kernels for 0.16 ms worth of
weight reads; launches, dtype casts and one-token grouped GEMMs take the time. Here each block's step is a
few fused launches that update the fp32 residual stream in place:

  Mamba block   norm + in_proj + conv -> x_proj in input slices -> dt_proj + SSM update + gate -> out_proj
                into the residual (from batch 2: the RMSNorm kernel of blocks.kernels.add_norm; in_proj, x_proj,
                dt_proj and out_proj on cuBLAS, real GEMMs there; the conv-step and SSM-step kernels between them)
  MoE block     norm + router logits (+ a top-1 router's choice) -> expert up + GLU -> expert down into the residual
                (fewer slots than experts, batch 1: only the routed experts are read; one token and a top-1
                router without a shared expert: norm, routing and expert up are one kernel); otherwise every
                expert runs on every token: one bmm, GLU + gate scaling in one kernel, one matmul

At batch 1 the kernels also pull a later kernel's weights into L2 while they run (blocks/kernels/decode.py):
norm + in_proj the block's out_proj, the routed expert's up kernel that expert's down projection, the expert
down kernel the next Mamba block's in_proj.

Any other block (attention, mamba2, dense MLP, a plug-in) takes its own `step`. The function is the same as
the modules' steps (`pytorch_reference()` runs those), up to where values are rounded: the normed input is
formed from the fp32 residual directly, and dt, the conv and the expert sums stay in fp32 between ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.kernels.add_norm import add_rms_norm_triton, rms_eps
from blocks.kernels.causal_conv1d import causal_conv1d_step_triton
from blocks.kernels.decode import (
    dt_proj_ssm_step, expert_down_residual_, linear_residual_, norm_gate, norm_in_proj_conv, route_glu_up,
    x_proj_split_k,
)
from blocks.kernels.ssm_step import selective_state_step_triton
from blocks.mamba import Mamba, MambaCache
from blocks.moe import MoE
from blocks.moe_decode import add_dense_experts_, add_routed_experts_, addmm_fp32_, route

ROUTE_UP = True  # one token, top-1 router: route_glu_up instead of norm_gate + expert_glu_up (benchmarks toggle it)


def _fusable_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.RMSNorm) and norm.weight is not None


def fusable_mamba(block) -> bool:
    m = block.mixer
    return (
        isinstance(m, Mamba) and m.backend != "torch" and _fusable_norm(block.norm)
        and m.in_proj.bias is None and m.out_proj.bias is None
    )


def fusable_moe(block) -> bool:
    return isinstance(block.mlp, MoE) and _fusable_norm(block.norm)


def mamba_step_(block, res_BD: Tensor, cache: MambaCache) -> None:
    """res += mixer(RMSNorm(res)) for one token, advancing the cache."""
    m: Mamba = block.mixer
    if res_BD.shape[0] == 1:
        x_BE, z_BE = norm_in_proj_conv(
            res_BD, block.norm.weight, rms_eps(block.norm), m.in_proj.weight,
            cache.conv_state, m.conv1d.weight[:, 0], m.conv1d.bias, prefetch=m.out_proj.weight,
        )
    else:  # a real GEMM: cuBLAS beats the fused kernel's tl.dot path there (40 against ~12 us at batch 64, H200)
        _, h_BD = add_rms_norm_triton(res_BD, None, block.norm.weight, rms_eps(block.norm), block.norm.weight.dtype)
        x_BE, z_BE = m.in_proj(h_BD).chunk(2, dim=-1)
        x_BE = causal_conv1d_step_triton(x_BE, cache.conv_state, m.conv1d.weight[:, 0], m.conv1d.bias, silu=True)
    R, N = m.dt_rank, m.d_state
    if res_BD.shape[0] == 1:  # x_proj in input slices, then dt_proj inside the SSM-step kernel: no cuBLAS
        # launch between PDL kernels (and one kernel fewer than x_proj, dt_proj, SSM step)
        parts = x_proj_split_k(x_BE, m.x_proj.weight)
        y_BE = dt_proj_ssm_step(parts, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, cache.ssm_state, x_BE, z_BE)
    else:  # x_proj and dt_proj on cuBLAS (real GEMMs from batch 2)
        dbc = F.linear(x_BE, m.x_proj.weight)  # (B, R + 2N): low-rank dt, B, C
        dt_BE = F.linear(dbc[:, :R], m.dt_proj.weight)  # its bias and softplus are applied in the SSM kernel
        y_BE = selective_state_step_triton(
            cache.ssm_state, x_BE, dt_BE, m.A_log, dbc[:, R:R + N], dbc[:, R + N:], D=m.D, z=z_BE,
            dt_bias=m.dt_proj.bias, dt_softplus=True, A_is_log=True,
        )
    if res_BD.shape[0] == 1 or not res_BD.is_cuda:
        linear_residual_(res_BD, y_BE, m.out_proj.weight)
    else:  # a real GEMM from batch 2: cuBLAS, accumulating into the residual
        addmm_fp32_(res_BD, y_BE, m.out_proj.weight.t())


def moe_step_(block, res_TD: Tensor, next_w: Tensor | None = None) -> None:
    """res += moe(RMSNorm(res)) for one token per row (the router in its current mode, as moe_step).
    next_w: the next block's first weight, which the batch-1 kernels pull into L2 while they run."""
    moe: MoE = block.mlp
    T, K = res_TD.shape[0], moe.top_k
    gate = moe.router.eval_gate() if K == 1 and not moe.router.training else None
    if ROUTE_UP and T == 1 and gate is not None and moe.shared is None:
        w_dtype = block.norm.weight.dtype  # the normed input's dtype, as norm_gate rounds it
        w_out = moe.w_out.to(w_dtype)
        a_SF, ids_TK, weights_TK = route_glu_up(
            res_TD, block.norm.weight, rms_eps(block.norm), moe.gate.weight, moe.gate.bias, gate,
            moe.w_in.to(w_dtype), moe.cfg.activation, w_out=w_out,
        )
        expert_down_residual_(res_TD, a_SF, ids_TK, weights_TK, w_out, prefetch=next_w)
        return
    out = norm_gate(res_TD, block.norm.weight, rms_eps(block.norm), moe.gate.weight, moe.gate.bias, gate)
    h_TD, logits_TE = out[:2]
    # the router's top-1 rule was applied inside the kernel, or the router applies its own
    ids_TK, weights_TK = out[2:] if gate is not None else route(moe, logits_TE)
    if T * K < moe.num_experts:  # read only the chosen experts
        add_routed_experts_(res_TD, moe, h_TD, ids_TK, weights_TK)
    else:
        add_dense_experts_(res_TD, moe, h_TD, ids_TK, weights_TK)
    if moe.shared is not None:  # the always-on shared expert: a dense MLP on the same normed input
        res_TD += moe.shared(h_TD).float()


def fused_step(model, idx_B: Tensor, cache: list) -> Tensor:
    """Logits (B, V) of the next token, as LM.step, advancing the cache; see the module docstring."""
    from blocks.model import MixerBlock  # the model module imports this one

    res_BD = model.embedding(idx_B).float()
    layers = model.layers
    for i, (block, c) in enumerate(zip(layers, cache)):
        if isinstance(block, MixerBlock):
            if fusable_mamba(block):
                mamba_step_(block, res_BD, c)
            else:
                res_BD = block.step(res_BD, c)
        elif fusable_moe(block):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            next_w = None
            if isinstance(nxt, MixerBlock) and fusable_mamba(nxt):  # its in_proj is the next kernel's weight
                next_w = nxt.mixer.in_proj.weight
            moe_step_(block, res_BD, next_w)
        else:
            res_BD = block.step(res_BD)
    return model.head(res_BD)
