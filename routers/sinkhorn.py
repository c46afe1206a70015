"""Sinkhorn routing as in BlackMamba (Anthony et al. 2024, arXiv 2402.01771, sec. 3.1)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from blocks.kernels import use_triton
from routers.base import Router, Routing, router_z_loss


@dataclass
class SinkhornConfig:
    """temperature: K = exp(logits / temperature); n_iters: fixed number of row+column scalings;
    z_loss_coef: weight of the router z-loss (0 = none; Sinkhorn needs no balancing loss)."""

    temperature: float = 0.5
    n_iters: int = 8
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {self.n_iters}")
        if self.z_loss_coef < 0:
            raise ValueError(f"z_loss_coef must be >= 0, got {self.z_loss_coef}")


def sinkhorn_log_plan(logits_TE: Tensor, temperature: float, n_iters: int) -> Tensor:
    """Log of the balanced transport plan P = diag(d0) K diag(d1), K = exp(logits / temperature).

    Rows of P are scaled towards sum 1/T and columns towards 1/E, starting from the column-normalised
    d1 = 1 / (E * colsum(K)) as in BlackMamba, then `n_iters` row-then-column scalings. Everything is in
    the log domain (logsumexp), so logits of any size stay finite; the loop count is fixed, so there is no
    convergence test and no host synchronisation.
    """
    T, E = logits_TE.shape
    log_K_TE = logits_TE.float() / temperature
    log_d1_E = -math.log(E) - torch.logsumexp(log_K_TE, dim=0)
    for _ in range(n_iters):
        log_d0_T = -math.log(T) - torch.logsumexp(log_K_TE + log_d1_E, dim=1)
        log_d1_E = -math.log(E) - torch.logsumexp(log_K_TE + log_d0_T[:, None], dim=0)
    return log_K_TE + log_d0_T[:, None] + log_d1_E


def sinkhorn_topk_ref(logits_TE: Tensor, k: int, temperature: float = 0.5, n_iters: int = 8) -> Tensor:
    """Reference twin of `routers.kernels.sinkhorn_topk`: expert_ids_TK (T, k) int64, the top-k experts of
    each token under the plan `sinkhorn_log_plan(logits_TE, temperature, n_iters)`. No gradient."""
    with torch.no_grad():
        return torch.topk(sinkhorn_log_plan(logits_TE, temperature, n_iters), k, dim=-1).indices


class SinkhornRouter(Router):
    """Training: experts are the top-k of the Sinkhorn-balanced plan over the whole batch; eval: top-k of
    the raw logits. Gate weight = sigmoid(raw logit of the chosen expert) in both modes.

    Batch-global in training: the column scalings d1 depend on every token of the batch, so a token's
    expert depends on the other tokens, later ones of its own sequence included (hence `causal = False`).
    The plan only picks experts and carries no gradient; the router learns through the sigmoid gate.
    In eval mode (validation, generation) routing is causal: argmax of the logits for k = 1, as the
    released BlackMamba model does at inference. No auxiliary loss is needed; an optional z-loss.
    On CUDA the training plan and its top-k are fused kernels (`routers.kernels.sinkhorn_topk`),
    elsewhere `sinkhorn_topk_ref`.
    """

    causal = False

    def __init__(self, num_experts: int, top_k: int, cfg: SinkhornConfig | None = None):
        super().__init__(num_experts, top_k)
        self.cfg = cfg if cfg is not None else SinkhornConfig()

    def route(self, logits_TE: Tensor) -> Routing:
        logits_TE = logits_TE.float()
        if not self.training:
            expert_ids_TK = torch.topk(logits_TE.detach(), self.top_k, dim=-1).indices
        elif use_triton(logits_TE):
            from routers.kernels.sinkhorn import sinkhorn_topk  # Triton imports on Linux only
            expert_ids_TK = sinkhorn_topk(logits_TE, self.top_k, self.cfg.temperature, self.cfg.n_iters)
        else:
            expert_ids_TK = sinkhorn_topk_ref(logits_TE, self.top_k, self.cfg.temperature, self.cfg.n_iters)
        weights_TK = torch.sigmoid(logits_TE.gather(1, expert_ids_TK))
        aux_losses: dict[str, Tensor] = {}
        if self.training and self.cfg.z_loss_coef > 0:
            aux_losses["z"] = self.cfg.z_loss_coef * router_z_loss(logits_TE)
        probs_TE = torch.softmax(logits_TE.detach(), dim=-1)
        return Routing(expert_ids_TK, weights_TK, probs_TE, aux_losses=aux_losses)
