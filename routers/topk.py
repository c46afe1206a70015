"""Top-k routing (Switch Transformer for k=1, Fedus et al. 2021; GShard / Mixtral for k>1), with the balancing
rules that build on it: the Switch balance loss per micro-batch or over the global batch (Qiu et al. 2025), and
auxiliary-loss-free balancing by a selection bias (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from blocks.kernels import use_triton
from routers.balancing import StepLoad
from routers.base import Router, Routing, balance_loss, count_per_expert, router_z_loss

GATES = ("softmax", "sigmoid")
BALANCE_SCOPES = ("micro_batch", "global_batch")


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
    A coefficient of 0 leaves that loss out.
    gate: "softmax" over the experts (Switch, Mixtral) or "sigmoid" per expert (DeepSeek-V3).
    balance_scope: where the balance loss takes its expert frequencies f_i from: "micro_batch", the tokens
        of this forward (Switch); "global_batch", the whole global batch of the last optimizer step, every
        micro-batch and data-parallel rank (Qiu et al. 2025; see TopKRouter).
    bias_update_rate: gamma of auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2): a per-expert bias on
        the scores that only the choice of experts sees, moved by gamma * sign(mean load - load) after each
        optimizer step. 0 = no bias. DeepSeek-V3 trains with 0.001 and no balance loss (aux_loss_coef=0)."""

    renormalize: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    gate: str = "softmax"
    balance_scope: str = "micro_batch"
    bias_update_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError(
                f"loss coefficients must be >= 0, got aux_loss_coef={self.aux_loss_coef}, "
                f"z_loss_coef={self.z_loss_coef}"
            )
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got '{self.gate}'")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got '{self.balance_scope}'")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0 (0 = no bias), got {self.bias_update_rate}")


def topk_gate_ref(
    logits_TE: Tensor, k: int, gate: str = "softmax", renormalize: bool = True, with_counts: bool = False,
    bias_E: Tensor | None = None,
) -> Gate:
    """Reference twin of `routers.kernels.topk_gate` (same arguments and outputs), in PyTorch ops.

    probs_TE (T, E) = softmax over experts or sigmoid per expert (`gate`); expert_ids_TK = the k highest of
    probs_TE, or of probs_TE + bias_E when a selection bias (E,) is given, best first; weights_TK = their
    probabilities (never the bias), divided by their sum when `renormalize` and k > 1;
    counts_E (E,) int32 = slots per expert when `with_counts`, else None.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    probs_TE = torch.softmax(logits_TE, dim=-1) if gate == "softmax" else torch.sigmoid(logits_TE)
    if bias_E is None:
        weights_TK, expert_ids_TK = torch.topk(probs_TE, k, dim=-1)
    else:
        expert_ids_TK = torch.topk(probs_TE.detach() + bias_E, k, dim=-1).indices
        weights_TK = probs_TE.gather(1, expert_ids_TK)
    if renormalize and k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    counts_E = count_per_expert(expert_ids_TK, logits_TE.shape[1]).int() if with_counts else None
    return Gate(weights_TK, expert_ids_TK, probs_TE, counts_E)


class TopKRouter(Router):
    """scores = softmax(logits) (or sigmoid, `gate`); each token goes to its k highest-scoring experts.

    The gate weight of a slot is the expert's score, renormalised over the token's k choices when
    `renormalize` and k > 1. For k = 1 the raw score is kept, as in the Switch Transformer: a single
    renormalised weight would be identically 1 and the router would get no gradient from the output.
    Causal in training and eval: a token's routing depends on its own logits (and per-expert constants) only.
    On CUDA the gate is one fused kernel (`routers.kernels.topk_gate`, bias included), elsewhere `topk_gate_ref`.

    Auxiliary losses (training only): balance = aux_loss_coef * E * sum_i f_i * P_i (Switch eq. 4), with P_i the
    mean probability of expert i over this forward's tokens (sigmoid scores normalised per token) and f_i
    - balance_scope=micro_batch: the fraction of this forward's slots that went to expert i;
    - balance_scope=global_batch: the fraction of the last optimizer step's slots, over its whole global batch
      (all micro-batches of gradient accumulation, all data-parallel ranks), kept by `StepLoad`. Qiu et al.
      synchronise f over the global batch; a micro-batch's backward runs before the later micro-batches of
      its step exist, so here f is that of the last complete global batch (as the bias below uses the last
      step's load). Each micro-batch's loss is then linear in its own P with one shared f, and the step's
      loss and gradient are those of the whole global batch however it is split into micro-batches or ranks.
      Before the first step f is uniform and the loss is the constant aux_loss_coef.
    z = z_loss_coef * router z-loss.

    Auxiliary-loss-free balancing (bias_update_rate = gamma > 0; DeepSeek-V3 sec. 2.1.2): experts are chosen
    by the top-k of score + b, gate weights stay the unbiased scores, and after every optimizer step
    (`end_step`) b_i += gamma * sign(mean load - load_i) from the load of that step's global batch. The bias
    is used in eval and generation too (frozen there), so validation measures the trained rule.
    """

    def __init__(self, num_experts: int, top_k: int, cfg: TopKConfig | None = None):
        super().__init__(num_experts, top_k)
        self.cfg = cfg if cfg is not None else TopKConfig()
        keep_counts = self.cfg.balance_scope == "global_batch" and self.cfg.aux_loss_coef > 0
        if keep_counts or self.cfg.bias_update_rate > 0:
            self.load = StepLoad(num_experts, self.cfg.bias_update_rate, keep_counts)
        else:
            self.load = None

    def eval_gate(self) -> str | None:
        """The gate over the top-k logits (either gate is monotone in the logit), unless a selection bias
        (aux-free balancing) picks the experts; renormalisation never applies to one slot."""
        if self.load is not None or (self.cfg.renormalize and self.top_k > 1):
            return None
        return self.cfg.gate

    def route(self, logits_TE: Tensor) -> Routing:
        logits_TE = logits_TE.float()
        if use_triton(logits_TE):
            from routers.kernels.topk_gate import topk_gate as gate_fn  # Triton imports on Linux only
        else:
            gate_fn = topk_gate_ref
        cfg = self.cfg
        with_counts = self.training and (cfg.aux_loss_coef > 0 or self.load is not None)
        bias_E = self.load.bias_E if self.load is not None else None
        weights_TK, expert_ids_TK, scores_TE, counts_E = gate_fn(
            logits_TE, self.top_k, cfg.gate, cfg.renormalize, with_counts, bias_E
        )
        if cfg.gate == "softmax":
            probs_TE = scores_TE
        else:  # independent sigmoids: a distribution over experts for the balance loss and the statistics
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        aux_losses: dict[str, Tensor] = {}
        if self.training:
            if self.load is not None:
                self.load.observe(counts_E)
            if cfg.aux_loss_coef > 0:
                if cfg.balance_scope == "global_batch":
                    freq_E = self.load.frequencies()
                else:
                    freq_E = counts_E / expert_ids_TK.numel()
                aux_losses["balance"] = cfg.aux_loss_coef * balance_loss(freq_E, probs_TE)
            if cfg.z_loss_coef > 0:
                aux_losses["z"] = cfg.z_loss_coef * router_z_loss(logits_TE)
        return Routing(expert_ids_TK, weights_TK, probs_TE, aux_losses=aux_losses)

    def end_step(self) -> None:
        if self.load is not None:
            self.load.end_step()

    def stats(self) -> dict[str, float | list[float]]:
        bias_E = self.load.bias_E if self.load is not None else None
        return {} if bias_E is None else {"expert_bias": bias_E.tolist()}


class Top1Router(TopKRouter):
    """TopKRouter restricted to k = 1 (Switch routing), registered as `top1`."""

    def __init__(self, num_experts: int, top_k: int, cfg: TopKConfig | None = None):
        if top_k != 1:
            raise ValueError(f"router=top1 sends each token to one expert, got top_k={top_k}; use router=topk")
        super().__init__(num_experts, top_k, cfg)
