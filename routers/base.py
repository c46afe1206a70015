"""The router contract shared by every routing rule.

Shape suffixes used across routers/ and blocks/moe.py:
    T tokens (batch * length, flattened), E experts, K slots per token (top-k).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Routing:
    """What a router decides for a batch of T tokens.

    expert_ids_TK: which expert each of a token's K slots goes to (int64).
    weights_TK:    the gate weight applied to that expert's output when combining.
    mask_TK:       False where a slot carries no token (expert-choice leaves slots empty,
                   a capacity limit drops them); None means every slot is used.
    probs_TE:      the router's probability over experts for each token, for utilization
                   statistics (entropy, load); not used for the forward computation.
    aux_losses:    named auxiliary losses, already multiplied by their coefficients.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    probs_TE: Tensor
    mask_TK: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class Router(nn.Module, ABC):
    """Base class: a routing rule over router logits. Holds no expert weights.

    Subclasses implement `route(logits_TE) -> Routing`. `self.training` selects the
    training rule; in eval mode (validation, generation) every router routes causally.
    """

    causal: bool = True  # False for rules where a token's routing depends on other tokens

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k

    @abstractmethod
    def route(self, logits_TE: Tensor) -> Routing:
        """Decide the expert slots and gate weights for each token."""

    def forward(self, logits_TE: Tensor) -> Routing:
        return self.route(logits_TE)

    def eval_gate(self) -> str | None:
        """The eval-mode rule when it is "each token's top-k logits, weighted by g": g's name, "sigmoid"
        (sigmoid of the chosen logit) or "softmax" (the chosen expert's softmax probability over all experts);
        None for any other rule (the default). Lets a decoding kernel route a token itself, without route()."""
        return None

    def end_step(self) -> None:
        """Called once per optimizer step in training, after all of the step's forward passes (`LM.end_step`).
        Rules that carry state from one step to the next (a selection bias, last step's load) update it
        here; the default does nothing."""

    def stats(self) -> dict[str, float | list[float]]:
        """Values of the rule's own state to log with the layer's utilization (e.g. a per-expert bias);
        read at validation, so it may synchronise with the host. The default has none."""
        return {}


def count_per_expert(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Number of entries of `expert_ids` equal to each of 0..num_experts-1 (int64).

    Unlike torch.bincount, which reads the maximum id back to the host on CUDA, a scatter-add keeps the
    count on the device, so routing and the MoE layer never synchronise with the host.
    """
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def balance_loss(freq_E: Tensor, probs_TE: Tensor) -> Tensor:
    """E * sum_i f_i * P_i: f_i the given fraction of slots that went to expert i (a constant: no gradient
    flows into it), P_i the mean router probability of expert i over the tokens of probs_TE (T, E).

    With f from the same tokens this is the Switch Transformer loss (Fedus et al. 2021, eq. 4); with f from
    a whole global batch, the global-batch loss of Qiu et al. 2025 ("Demons in the Detail", eq. 2 with
    f synchronised over the global batch). Linear in P, so the mean of the losses of equal-sized
    micro-batches that share one f is the loss of their union.
    """
    return freq_E.numel() * (freq_E.detach().to(probs_TE.dtype) * probs_TE.mean(dim=0)).sum()


def switch_balance_loss(
    probs_TE: Tensor, expert_ids_TK: Tensor, num_experts: int, counts_E: Tensor | None = None
) -> Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    f_i is the fraction of routed slots sent to expert i, P_i the mean router probability of i.
    Its minimum, 1, is reached by a uniform load. `counts_E`: the slots per expert of expert_ids_TK when
    already known (the fused gate kernel counts them), else they are counted here.
    """
    if counts_E is None:
        counts_E = count_per_expert(expert_ids_TK, num_experts)
    return balance_loss(counts_E / expert_ids_TK.numel(), probs_TE)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
