"""Sinkhorn routing as in BlackMamba (Anthony et al. 2024, arXiv 2402.01771, sec. 3.1)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from blocks.kernels import use_triton
from routers.base import Router, Routing, router_z_loss


@dataclass
class SinkhornConfig:
    """temperature: K = exp(logits / temperature); n_iters: fixed number of row+column scalings;
    z_loss_coef: weight of the router z-loss (0 = none; Sinkhorn needs no balancing loss).
    balance_scope: "micro_batch" balances the experts' load over this process's batch; "global_batch" over the
        batches of every data-parallel rank together (the column sums of the plan are all-reduced: 2 small
        all-reduces per iteration), so that a run on W ranks routes as one process on the W batches would.
        Within one rank, micro-batches of gradient accumulation are still balanced one at a time."""

    temperature: float = 0.5
    n_iters: int = 8
    z_loss_coef: float = 0.0
    balance_scope: str = "micro_batch"

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {self.n_iters}")
        if self.z_loss_coef < 0:
            raise ValueError(f"z_loss_coef must be >= 0, got {self.z_loss_coef}")
        if self.balance_scope not in ("micro_batch", "global_batch"):
            raise ValueError(f"balance_scope must be one of micro_batch, global_batch, got '{self.balance_scope}'")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _logsumexp_tokens(x_TE: Tensor, all_ranks: bool) -> Tensor:
    """logsumexp over the tokens (dim 0), over every rank's tokens when all_ranks: the max is all-reduced first,
    so the sum of exponentials stays in range, as in torch.logsumexp."""
    if not all_ranks:
        return torch.logsumexp(x_TE, dim=0)
    m_E = x_TE.amax(dim=0)
    dist.all_reduce(m_E, op=dist.ReduceOp.MAX)
    m_E = torch.where(torch.isfinite(m_E), m_E, 0)
    s_E = torch.exp(x_TE - m_E).sum(dim=0)
    dist.all_reduce(s_E)
    return m_E + torch.log(s_E)


def sinkhorn_log_plan(logits_TE: Tensor, temperature: float, n_iters: int, all_ranks: bool = False) -> Tensor:
    """Log of the balanced transport plan P = diag(d0) K diag(d1), K = exp(logits / temperature).

    Rows of P are scaled towards sum 1/T and columns towards 1/E, starting from the column-normalised
    d1 = 1 / (E * colsum(K)) as in BlackMamba, then `n_iters` row-then-column scalings. Everything is in
    the log domain (logsumexp), so logits of any size stay finite; the loop count is fixed, so there is no
    convergence test and no host synchronisation.

    all_ranks (torch.distributed initialised): the plan of the tokens of every rank together, each rank holding
    its rows: T is the total token count and the column sums are all-reduced.
    """
    T, E = logits_TE.shape
    all_ranks = all_ranks and _distributed()
    if all_ranks:
        T_total = torch.tensor([T], dtype=torch.float64, device=logits_TE.device)
        dist.all_reduce(T_total)
        T = int(T_total.item())
    log_K_TE = logits_TE.float() / temperature
    log_d1_E = -math.log(E) - _logsumexp_tokens(log_K_TE, all_ranks)
    for _ in range(n_iters):
        log_d0_T = -math.log(T) - torch.logsumexp(log_K_TE + log_d1_E, dim=1)
        log_d1_E = -math.log(E) - _logsumexp_tokens(log_K_TE + log_d0_T[:, None], all_ranks)
    return log_K_TE + log_d0_T[:, None] + log_d1_E


def sinkhorn_topk_ref(logits_TE: Tensor, k: int, temperature: float = 0.5, n_iters: int = 8,
                      all_ranks: bool = False) -> Tensor:
    """Reference twin of `routers.kernels.sinkhorn_topk`: expert_ids_TK (T, k) int64, the top-k experts of
    each token under the plan `sinkhorn_log_plan(logits_TE, temperature, n_iters, all_ranks)`. No gradient."""
    with torch.no_grad():
        return torch.topk(sinkhorn_log_plan(logits_TE, temperature, n_iters, all_ranks), k, dim=-1).indices


class SinkhornRouter(Router):
    """Training: experts are the top-k of the Sinkhorn-balanced plan over the whole batch; eval: top-k of
    the raw logits. Gate weight = sigmoid(raw logit of the chosen expert) in both modes.

    Batch-global in training: the column scalings d1 depend on every token of the batch, so a token's
    expert depends on the other tokens, later ones of its own sequence included (hence `causal = False`).
    The plan only picks experts and carries no gradient; the router learns through the sigmoid gate.
    In eval mode (validation, generation) routing is causal: argmax of the logits for k = 1, as the
    released BlackMamba model does at inference. No auxiliary loss is needed; an optional z-loss.
    On CUDA the training plan and its top-k are fused kernels (`routers.kernels.sinkhorn_topk`),
    elsewhere, and with balance_scope=global_batch over several ranks, `sinkhorn_topk_ref`.
    """

    causal = False

    def __init__(self, num_experts: int, top_k: int, cfg: SinkhornConfig | None = None):
        super().__init__(num_experts, top_k)
        self.cfg = cfg if cfg is not None else SinkhornConfig()

    def eval_gate(self) -> str:
        return "sigmoid"

    def route(self, logits_TE: Tensor) -> Routing:
        logits_TE = logits_TE.float()
        all_ranks = self.cfg.balance_scope == "global_batch" and _distributed()
        if not self.training:
            expert_ids_TK = torch.topk(logits_TE.detach(), self.top_k, dim=-1).indices
        elif all_ranks:  # the fused kernel sees one rank's tokens only
            expert_ids_TK = sinkhorn_topk_ref(logits_TE, self.top_k, self.cfg.temperature, self.cfg.n_iters, True)
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
