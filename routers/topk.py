"""Softmax top-k routing (Switch Transformer for k=1, Fedus et al. 2021; GShard / Mixtral for k>1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routers.base import Router, Routing, router_z_loss, switch_balance_loss


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


class TopKRouter(Router):
    """probs = softmax(logits); each token goes to its k most probable experts.

    The gate weight of a slot is the expert's probability, renormalised over the token's k choices when
    `renormalize` and k > 1. For k = 1 the raw probability is kept, as in the Switch Transformer: a single
    renormalised weight would be identically 1 and the router would get no gradient from the output.
    Causal in training and eval: a token's routing depends on its own logits only.
    Auxiliary losses (training only): balance = coef * switch_balance_loss (Switch eq. 4), z = coef * z-loss.
    """

    def __init__(self, num_experts: int, top_k: int, cfg: TopKConfig | None = None):
        super().__init__(num_experts, top_k)
        self.cfg = cfg if cfg is not None else TopKConfig()

    def route(self, logits_TE: Tensor) -> Routing:
        logits_TE = logits_TE.float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.cfg.renormalize and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        aux_losses: dict[str, Tensor] = {}
        if self.training:
            if self.cfg.aux_loss_coef > 0:
                balance = switch_balance_loss(probs_TE, expert_ids_TK, self.num_experts)
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
