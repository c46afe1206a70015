"""Softmax top-k routing (Switch Transformer for k=1, Fedus et al. 2021; GShard / Mixtral for k>1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from blocks.kernels import use_triton
from routers.base import Router, Routing, count_per_expert, router_z_loss, switch_balance_loss

GATES = ("softmax", "sigmoid")


class Gate(NamedTuple):
    """The gate of T tokens over E experts: weights_TK (T, k) fp32, expert_ids_TK (T, k) int64,
    probs_TE (T, E) fp32, counts_E (E,) int32 slots per expert (None unless asked for)."""

    weights_TK: Tensor
    expert_ids_TK: Tensor
    probs_TE: Tensor
    counts_E: Tensor | None


@dataclass
class TopKConfig:
    """renormalize: rescale a token's k gate weights to sum to 1 (only meaningful for k > 1).
    aux_loss_coef: weight of the Switch load-balancing loss; z_loss_coef: weight of the router z-loss.
    A coefficient of 0 leaves that loss out."""

    renormalize: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError(
                f"loss coefficients must be >= 0, got aux_loss_coef={self.aux_loss_coef}, "
                f"z_loss_coef={self.z_loss_coef}"
            )


def topk_gate_ref(
    logits_TE: Tensor, k: int, gate: str = "softmax", renormalize: bool = True, with_counts: bool = False
) -> Gate:
    """Reference twin of `routers.kernels.topk_gate` (same arguments and outputs), in PyTorch ops.

    probs_TE (T, E) = softmax over experts or sigmoid per expert (`gate`); (weights_TK, expert_ids_TK)
    = torch.topk(probs_TE, k), the weights divided by their sum when `renormalize` and k > 1;
    counts_E (E,) int32 = slots per expert when `with_counts`, else None.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    probs_TE = torch.softmax(logits_TE, dim=-1) if gate == "softmax" else torch.sigmoid(logits_TE)
    weights_TK, expert_ids_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize and k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    counts_E = count_per_expert(expert_ids_TK, logits_TE.shape[1]).int() if with_counts else None
    return Gate(weights_TK, expert_ids_TK, probs_TE, counts_E)


class TopKRouter(Router):
    """probs = softmax(logits); each token goes to its k most probable experts.

    The gate weight of a slot is the expert's probability, renormalised over the token's k choices when
    `renormalize` and k > 1. For k = 1 the raw probability is kept, as in the Switch Transformer: a single
    renormalised weight would be identically 1 and the router would get no gradient from the output.
    Causal in training and eval: a token's routing depends on its own logits only.
    On CUDA the gate is one fused kernel (`routers.kernels.topk_gate`), elsewhere `topk_gate_ref`.
    Auxiliary losses (training only): balance = coef * switch_balance_loss (Switch eq. 4), z = coef * z-loss.
    """

    def __init__(self, num_experts: int, top_k: int, cfg: TopKConfig | None = None):
        super().__init__(num_experts, top_k)
        self.cfg = cfg if cfg is not None else TopKConfig()

    def route(self, logits_TE: Tensor) -> Routing:
        logits_TE = logits_TE.float()
        if use_triton(logits_TE):
            from routers.kernels.topk_gate import topk_gate as gate_fn  # Triton imports on Linux only
        else:
            gate_fn = topk_gate_ref
        with_counts = self.training and self.cfg.aux_loss_coef > 0
        weights_TK, expert_ids_TK, probs_TE, counts_E = gate_fn(
            logits_TE, self.top_k, "softmax", self.cfg.renormalize, with_counts
        )
        aux_losses: dict[str, Tensor] = {}
        if self.training:
            if self.cfg.aux_loss_coef > 0:
                balance = switch_balance_loss(probs_TE, expert_ids_TK, self.num_experts, counts_E)
                aux_losses["balance"] = self.cfg.aux_loss_coef * balance
            if self.cfg.z_loss_coef > 0:
                aux_losses["z"] = self.cfg.z_loss_coef * router_z_loss(logits_TE)
        return Routing(expert_ids_TK, weights_TK, probs_TE, aux_losses=aux_losses)


class Top1Router(TopKRouter):
    """TopKRouter restricted to k = 1 (Switch routing), registered as `top1`."""

    def __init__(self, num_experts: int, top_k: int, cfg: TopKConfig | None = None):
        if top_k != 1:
            raise ValueError(f"router=top1 sends each token to one expert, got top_k={top_k}; use router=topk")
        super().__init__(num_experts, top_k, cfg)
