"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", sec. 2.1), as a plug-in.

    python run.py --plugin docs/plugins/noisy_topk.py router=noisy_topk router.noise_std=0.5
"""
from dataclasses import dataclass

import torch

from routers import Router, Routing, register_router, router_z_loss, switch_balance_loss


@dataclass
class NoisyTopKConfig:
    noise_std: float = 1.0  # std of the Gaussian noise added to the logits in training
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.0  # router z-loss

    def __post_init__(self):
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@register_router("noisy_topk", NoisyTopKConfig)
class NoisyTopKRouter(Router):
    """Training: each token takes the top-k experts of its logits plus N(0, noise_std^2) noise, with the
    softmax of the noisy logits as gate weights; eval: the same without noise (causal, deterministic)."""

    def __init__(self, num_experts: int, top_k: int, cfg: NoisyTopKConfig):
        super().__init__(num_experts, top_k)
        self.cfg = cfg

    def route(self, logits_TE: torch.Tensor) -> Routing:
        logits_TE = logits_TE.float()
        if self.training:
            logits_TE = logits_TE + self.cfg.noise_std * torch.randn_like(logits_TE)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, expert_ids_TK = probs_TE.topk(self.top_k, dim=-1)
        aux_losses = {}
        if self.training and self.cfg.aux_loss_coef > 0:
            balance = switch_balance_loss(probs_TE, expert_ids_TK, self.num_experts)
            aux_losses["balance"] = self.cfg.aux_loss_coef * balance
        if self.training and self.cfg.z_loss_coef > 0:
            aux_losses["z"] = self.cfg.z_loss_coef * router_z_loss(logits_TE)
        return Routing(expert_ids_TK, weights_TK, probs_TE, aux_losses=aux_losses)
