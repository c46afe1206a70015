"""Parameter and FLOP accounting, in one place, for MFU figures and scaling plots.

FLOPs count a multiply-add as 2. A training step costs 3x the forward pass (the backward computes
gradients for both activations and weights). MoE layers count only the experts a token visits
(top_k of num_experts, after granularity: m*K of m*E experts of width F/m), which is what makes their
active parameters differ from their total; the router gate and shared experts are always active.
A mixer without a rule here (a plug-in) counts its nn.Linear layers, unless it defines
`flops_per_token(seq_len) -> float`, its whole forward FLOPs per token, which is then used instead.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from blocks.attention import Attention
from blocks.mamba import Mamba
from blocks.mamba2 import Mamba2
from blocks.model import LM, MixerBlock, MLPBlock
from blocks.moe import MoE

SCAN_FLOPS_PER_STATE = 9  # Mamba-1 scan per (channel, state) and token: exp, 2 mul-adds for h, 1 for y


@dataclass
class Accounting:
    total_params: int
    active_params: int
    params: dict[str, int] = field(default_factory=dict)  # by component
    fwd_flops_per_token: dict[str, float] = field(default_factory=dict)  # by component

    @property
    def train_flops_per_token(self) -> float:
        return 3 * sum(self.fwd_flops_per_token.values())

    @property
    def infer_flops_per_token(self) -> float:
        return sum(self.fwd_flops_per_token.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.params.items())
        return (
            f"params {self.total_params / 1e6:.2f}M total, {self.active_params / 1e6:.2f}M active ({parts}); "
            f"train {self.train_flops_per_token / 1e6:.1f} MFLOP/token"
        )


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_flops(module: nn.Module) -> float:
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _mixer_flops(mixer: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of one mixer at training length seq_len (causal attention averages L/2)."""
    if hasattr(mixer, "flops_per_token"):
        return float(mixer.flops_per_token(seq_len))
    flops = _linear_flops(mixer)
    if isinstance(mixer, Mamba):
        d_inner, d_state = mixer.A_log.shape
        flops += 2 * mixer.conv1d.weight.numel() + SCAN_FLOPS_PER_STATE * d_inner * d_state
    elif isinstance(mixer, Mamba2):
        H, P, N, G, Q = mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups, mixer.chunk_size
        # intra-chunk: C.B scores and their product with x; inter-chunk: chunk states, state passing, output
        flops += 2 * mixer.conv1d.weight.numel() + 2 * Q * (G * N + H * P) + 3 * 2 * H * P * N
    elif isinstance(mixer, Attention):
        # q.k and attention-weighted v, each 2 * H * K per visible key; on average (L + 1) / 2 keys are visible
        flops += 2 * 2 * mixer.H * mixer.K * (seq_len + 1) / 2
    return flops


def _moe_split(moe: MoE) -> tuple[int, int, float]:
    """(total params, active params, forward FLOPs per token) of an MoE layer."""
    per_expert = (moe.w_in.numel() + moe.w_out.numel()) // moe.num_experts
    total = _numel(moe)
    inactive = (moe.num_experts - moe.top_k) * per_expert
    flops = _linear_flops(moe) + 2 * moe.top_k * per_expert
    return total, total - inactive, flops


def account(model: LM, seq_len: int) -> Accounting:
    """Count parameters (total and active) and forward FLOPs per token by component."""
    params: dict[str, int] = defaultdict(int)
    flops: dict[str, float] = defaultdict(float)
    active = 0
    params["embedding"] = model.embedding.weight.numel()
    for block in model.layers:
        params["norm"] += _numel(block.norm)
        if isinstance(block, MixerBlock):
            kind = type(block.mixer).__name__.lower()
            params[kind] += _numel(block.mixer)
            flops[kind] += _mixer_flops(block.mixer, seq_len)
        elif isinstance(block, MLPBlock) and isinstance(block.mlp, MoE):
            total, act, f = _moe_split(block.mlp)
            params["moe"] += total
            active -= total - act
            flops["moe"] += f
        else:
            params["mlp"] += _numel(block.mlp)
            flops["mlp"] += _linear_flops(block.mlp)
    params["norm"] += _numel(model.norm_f)
    head_params = model.lm_head.weight.numel() if model.lm_head is not None else 0
    if head_params:
        params["head"] = head_params
    flops["head"] = 2 * model.embedding.weight.numel()
    total = sum(params.values())
    return Accounting(total, total + active, dict(params), dict(flops))
