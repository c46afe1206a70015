"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", sec. 3.1)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from routers.base import Router, Routing, router_z_loss


@dataclass
class ExpertChoiceConfig:
    """capacity_factor: c in the paper, the mean number of experts per token in units of top_k, so an
    expert takes C = min(T, ceil(capacity_factor * top_k * T / E)) tokens; z_loss_coef: router z-loss."""

    capacity_factor: float = 1.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.z_loss_coef < 0:
            raise ValueError(f"z_loss_coef must be >= 0, got {self.z_loss_coef}")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes: C = min(T, ceil(capacity_factor * top_k * T / E)).

    With capacity_factor = 1 the experts process T * top_k slots in all, the same compute as top-k routing.
    """
    return min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


class ExpertChoiceRouter(Router):
    """Training: probs = softmax over experts per token (the paper's S = softmax(X W_g)); each expert
    takes the C tokens of the batch with the highest probability for it (`expert_capacity`).

    Every expert is filled exactly to capacity, so load is perfectly balanced and no auxiliary loss is
    needed; a token may get zero, one or several experts. In `Routing` each token has K = E slots:
    expert_ids_TK[t, e] = e, weights_TK[t, e] = probs[t, e] where expert e chose t (else 0), and
    mask_TK[t, e] is True only where chosen.

    NOT causal (`causal = False`): which tokens an expert takes depends on every token of the batch,
    later tokens of the same sequence included, so a causal LM trained this way sees a little of the
    future. Generation cannot use the rule at all (one token at a time), so in eval mode the router falls
    back to causal softmax top-k (k = top_k, weights = the raw probabilities). A warning says so once
    at construction.
    """

    causal = False

    def __init__(self, num_experts: int, top_k: int, cfg: ExpertChoiceConfig | None = None):
        super().__init__(num_experts, top_k)
        self.cfg = cfg if cfg is not None else ExpertChoiceConfig()
        warnings.warn(
            "router=expert_choice is not causal: in training a token's experts depend on later tokens of "
            "its sequence, which leaks future information into a causal LM. Eval and generation use a "
            "causal softmax top-k fallback, so validation does not measure the training-time rule.",
            UserWarning,
            stacklevel=2,
        )

    def eval_gate(self) -> str:
        return "softmax"  # eval: each token's top-k of the softmax

    def route(self, logits_TE: Tensor) -> Routing:
        logits_TE = logits_TE.float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if not self.training:
            weights_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            return Routing(expert_ids_TK, weights_TK, probs_TE)
        T, E = probs_TE.shape
        capacity = expert_capacity(T, E, self.top_k, self.cfg.capacity_factor)
        chosen_CE = torch.topk(probs_TE.detach(), capacity, dim=0).indices
        mask_TE = torch.zeros(T, E, dtype=torch.bool, device=probs_TE.device).scatter_(0, chosen_CE, True)
        weights_TE = probs_TE * mask_TE
        expert_ids_TE = torch.arange(E, device=probs_TE.device).expand(T, E)
        aux_losses: dict[str, Tensor] = {}
        if self.cfg.z_loss_coef > 0:
            aux_losses["z"] = self.cfg.z_loss_coef * router_z_loss(logits_TE)
        return Routing(expert_ids_TE, weights_TE, probs_TE, mask_TK=mask_TE, aux_losses=aux_losses)
