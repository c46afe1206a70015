"""Mixture-of-experts MLP layer: a router over E gated-MLP experts, computed grouped by expert.

Shapes: B batch, L length, D model width, T = B*L tokens, E experts, K slots per token,
F expert hidden width, S = T*K slots (flattened).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.expert_parallel import ep_moe_experts
from blocks.kernels import use_triton
from blocks.mlp import MLP, glu_activation
from routers import ExpertChoiceRouter, Routing, build_router, count_per_expert
from routers.expert_choice import expert_capacity


@dataclass
class MoEConfig:
    """num_experts, top_k: E experts, K of them per token (expert-choice routing uses K = E slots).
    ffn_dim: expert hidden width F (None: the model's ffn_dim). activation: swiglu | geglu.
    capacity_factor: None = dropless; else, in training, each expert takes at most
        ceil(capacity_factor * T * top_k / E) slots, first come in token order; the rest are dropped
        (the token keeps only its residual). Eval is always dropless, so that validation and
        token-by-token generation compute the same function.
    granularity: m, fine-grained experts (DeepSeekMoE, Dai et al. 2024, sec. 3.1): each of the E experts is
        split into m experts of width F/m, and tokens take m*K of the m*E, so total and active expert
        parameters and FLOPs stay those of E experts of width F with top-K (m must divide F).
    num_shared_experts: K_s always-on shared experts of the fine-grained width F/m (DeepSeekMoE sec. 3.2),
        computed as one dense MLP of width K_s*F/m added to the routed output (0 = none).
    shared_ffn_dim: the width of that dense shared MLP given directly instead (0 = none); set at most one
        of the two.
    router, router_cfg: a name in routers.ROUTERS and overrides of its config dataclass.
    expert_parallel: the size P of the expert-parallel group in a distributed run (P must divide the E experts
        and the number of processes); the layer is built whole and sharded once torch.distributed is up
        (blocks.expert_parallel.shard_experts). 1 = every rank holds every expert."""

    num_experts: int = 8
    top_k: int = 1
    ffn_dim: int | None = None
    activation: str = "swiglu"
    capacity_factor: float | None = None
    shared_ffn_dim: int = 0
    granularity: int = 1
    num_shared_experts: int = 0
    router: str = "sinkhorn"
    router_cfg: dict | None = None
    expert_parallel: int = 1  # P ranks share the experts, E/P each (blocks/expert_parallel.py); 1 = off


def apply_capacity(expert_ids_TK: Tensor, mask_TK: Tensor | None, num_experts: int, capacity: int) -> Tensor:
    """Keep-mask after a capacity limit: slot (t, k) survives if fewer than `capacity` active slots went
    to its expert before it in (token, slot) order. Sort-based, so no host synchronisation."""
    T, K = expert_ids_TK.shape
    ids_S = expert_ids_TK.reshape(-1)
    active_S = mask_TK.reshape(-1) if mask_TK is not None else torch.ones_like(ids_S, dtype=torch.bool)
    ids_S = torch.where(active_S, ids_S, num_experts)
    order_S = torch.argsort(ids_S, stable=True)
    counts = count_per_expert(ids_S, num_experts + 1)
    starts = counts.cumsum(0) - counts
    rank_sorted_S = torch.arange(ids_S.numel(), device=ids_S.device) - starts[ids_S[order_S]]
    rank_S = torch.empty_like(rank_sorted_S).scatter_(0, order_S, rank_sorted_S)
    return (active_S & (rank_S < capacity)).view(T, K)


def _can_use_grouped_mm(x_SD: Tensor, w_in: Tensor) -> bool:
    # torch._grouped_mm wants bf16 on a Hopper-class GPU and 16-byte aligned rows (D, F multiples of 8).
    D, F2 = w_in.shape[1:]
    return (
        hasattr(torch, "_grouped_mm")
        and x_SD.is_cuda
        and x_SD.dtype == torch.bfloat16
        and D % 8 == 0
        and F2 % 16 == 0
        and torch.cuda.get_device_capability(x_SD.device) >= (9, 0)
    )


def moe_experts_ref(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    mask_TK: Tensor | None,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    *,
    grouped_mm: bool | None = None,
) -> Tensor:
    """y[t] = sum over active slots k of weights[t, k] * expert_{ids[t, k]}(x[t]), expert_e(x) =
    glu(x @ w_in[e]) @ w_out[e]; masked slots contribute nothing. Pure PyTorch reference for fused kernels.

    Slots are sorted by expert (stable, so token order within an expert), counted per expert, and each
    projection runs as one grouped GEMM over contiguous row groups: torch._grouped_mm with int32 end
    offsets (`grouped_mm=None` picks it on CUDA in bf16), else a loop over the experts' slices.
    Masked slots are sorted past the last group; their rows are zeroed before and after the GEMMs so that
    the uninitialised rows _grouped_mm leaves there reach neither the output nor any gradient.
    Results are combined per token in fp32 with index_add_ and returned in x_TD's dtype.
    """
    T, D = x_TD.shape
    K = expert_ids_TK.shape[1]
    E, F2 = w_in.shape[0], w_in.shape[2]
    assert w_in.shape == (E, D, F2) and w_out.shape == (E, F2 // 2, D), (w_in.shape, w_out.shape)
    assert expert_ids_TK.shape == weights_TK.shape == (T, K)
    act = glu_activation(activation)

    ids_S = expert_ids_TK.reshape(-1)
    if mask_TK is not None:
        ids_S = torch.where(mask_TK.reshape(-1), ids_S, E)  # sentinel E sorts after every expert
    order_S = torch.argsort(ids_S, stable=True)
    ids_S = ids_S[order_S]
    token_S = order_S // K
    ends_E = count_per_expert(ids_S, E + 1)[:E].cumsum(0)
    keep_S1 = (ids_S < E)[:, None]

    device_type = x_TD.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_TD.dtype
    x_SD = torch.where(keep_S1, x_TD[token_S], 0).to(dtype)
    w_in, w_out = w_in.to(dtype), w_out.to(dtype)
    if grouped_mm is None:
        grouped_mm = _can_use_grouped_mm(x_SD, w_in)
    if grouped_mm:
        offs_E = ends_E.to(torch.int32)
        h_SF2 = torch._grouped_mm(x_SD, w_in, offs=offs_E)
        y_SD = torch._grouped_mm(act(h_SF2), w_out, offs=offs_E)
    else:
        pieces, start = [], 0
        for e, end in enumerate(ends_E.tolist()):
            if end > start:
                pieces.append(act(x_SD[start:end] @ w_in[e]) @ w_out[e])
            start = end
        pieces.append(x_SD.new_zeros(x_SD.shape[0] - start, D))
        y_SD = torch.cat(pieces)
    y_SD = torch.where(keep_S1, y_SD, 0).float()
    w_S1 = weights_TK.reshape(-1)[order_S].float()[:, None]
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    return out_TD.index_add_(0, token_S, y_SD * w_S1).to(x_TD.dtype)


def moe_experts(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    mask_TK: Tensor | None,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    max_active_slots: int | None = None,
) -> Tensor:
    """The experts' combined output (see moe_experts_ref): the fused Triton kernels on CUDA
    (blocks.kernels.moe), the PyTorch reference elsewhere. Both give the same values and gradients.
    On an H200 the kernels measured faster than argsort + torch._grouped_mm at every benchmarked shape
    (benchmarks/RESULTS.md), so CUDA always takes them. max_active_slots: a bound on the unmasked slots,
    which lets the kernels size their buffers to it (expert-choice routing keeps E * capacity of T * E)."""
    if use_triton(x_TD, kernel="moe_experts"):
        from blocks.kernels.moe import moe_experts_triton  # imports Triton, which only Linux installs

        return moe_experts_triton(
            x_TD, expert_ids_TK, weights_TK, mask_TK, w_in, w_out, activation, max_active_slots=max_active_slots
        )
    return moe_experts_ref(x_TD, expert_ids_TK, weights_TK, mask_TK, w_in, w_out, activation)


def gate_logits(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None) -> Tensor:
    """The router's fp32 logits x W^T + b from x in its own dtype: a kernel that reads x once on CUDA
    (blocks.kernels.gate), F.linear on fp32 copies (its twin) elsewhere."""
    if use_triton(x_TD, kernel="gate") and x_TD.dtype != torch.float64:
        from blocks.kernels.gate import gate_logits_triton  # imports Triton, which only Linux installs

        return gate_logits_triton(x_TD, weight_ED, bias_E)
    return F.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())


class MoE(nn.Module):
    """Mixture-of-experts MLP (BlackMamba's MoE block): y = sum_k g_k(x) * expert_{e_k}(x) [+ shared(x)].

    With granularity m the layer has E' = m*E experts of width F' = F/m and routes K' = m*K of them per token;
    num_experts, top_k and ffn_dim hold E', K' and F'. gate: Linear(D, E') with bias giving the router logits
    (computed in fp32); router: the routing rule (no weights); w_in (E', D, 2F'), w_out (E', F', D): the
    experts' fused GLU projections, no biases; shared: optional dense MLP of width S = shared_ffn_dim or
    num_shared_experts*F'. Parameters: D*E' + E' + E'*3*D*F' (+ 3*D*S); active: the same with K' for E'
    in the expert term (blocks.accounting).

    forward returns (y_BLD, aux_losses) where aux_losses are the router's, already weighted.
    Utilization counters (non-persistent buffers, updated in training only, under no_grad, on the device
    with scatter/index adds, so they never synchronise with the host):
    tokens_per_expert (slots each expert processed), dropped_tokens (slots dropped by the capacity
    limit), routed_slots (slots the router assigned), tokens_without_expert (tokens that no expert processed:
    every slot dropped, or, with expert choice, chosen by none; they keep only the residual), router_entropy_sum (sum over tokens of the
    router's entropy / log E), num_tokens, router_prob_sum (E: sum over tokens of the router probability of
    each expert), coactivation (E x E: tokens whose processed experts include both i and j; the diagonal
    is tokens_per_expert), aux_loss_sum and aux_loss_count (per AUX_LOSS_NAMES: the sum of the loss, as
    weighted in the training loss, over the forward calls that produced it), and, once track_tokens(V) has
    allocated them, token_expert (V x E: slots of token id v that expert e processed) and token_counts (V:
    occurrences of token id v), fed by observe_tokens(ids) before each forward.
    Read them with utilization_stats() / utilization_arrays(), clear with reset_utilization().
    """

    AUX_LOSS_NAMES = ("balance", "z")  # the routers' auxiliary losses, accumulated per layer
    expert_groups = None  # set by blocks.expert_parallel.shard_experts when the experts are sharded

    def __init__(self, d_model: int, cfg: MoEConfig, ffn_dim: int):
        super().__init__()
        ffn = cfg.ffn_dim if cfg.ffn_dim is not None else ffn_dim
        m = cfg.granularity
        if cfg.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {cfg.num_experts}")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={cfg.num_experts}], got {cfg.top_k}")
        if cfg.expert_parallel < 1 or (cfg.num_experts * m) % cfg.expert_parallel:
            raise ValueError(f"moe.expert_parallel={cfg.expert_parallel} must be >= 1 and divide the number of experts "
                             f"{cfg.num_experts * m} (num_experts x granularity): each rank holds an equal share")
        if cfg.capacity_factor is not None and not (math.isfinite(cfg.capacity_factor) and cfg.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a finite number > 0 or None (dropless), got {cfg.capacity_factor}")
        if d_model < 1 or ffn < 1:
            raise ValueError(f"d_model and ffn_dim must be >= 1, got d_model={d_model}, ffn_dim={ffn}")
        if m < 1 or ffn % m:
            raise ValueError(f"granularity must be >= 1 and divide the expert ffn_dim {ffn}, got {m}")
        if m > 1 and cfg.router == "top1":
            raise ValueError(f"granularity {m} routes {m * cfg.top_k} fine-grained experts per token; use router=topk")
        if cfg.shared_ffn_dim < 0 or cfg.num_shared_experts < 0:
            raise ValueError(f"shared_ffn_dim and num_shared_experts must be >= 0 (0 = no shared expert), got "
                             f"{cfg.shared_ffn_dim} and {cfg.num_shared_experts}")
        if cfg.shared_ffn_dim and cfg.num_shared_experts:
            raise ValueError("set one of shared_ffn_dim (a width) and num_shared_experts (a count of experts of "
                             "width ffn_dim / granularity), not both")
        glu_activation(cfg.activation)  # raises ValueError listing the valid activations

        self.cfg = cfg
        E, ffn = cfg.num_experts * m, ffn // m
        self.num_experts = E
        self.top_k = cfg.top_k * m
        self.ffn_dim = ffn
        self.gate = nn.Linear(d_model, E, bias=True)
        self.router = build_router(cfg.router, E, self.top_k, cfg.router_cfg)
        self.w_in = nn.Parameter(torch.empty(E, d_model, 2 * ffn))
        self.w_out = nn.Parameter(torch.empty(E, ffn, d_model))
        shared_width = cfg.shared_ffn_dim or cfg.num_shared_experts * ffn
        self.shared = MLP(d_model, shared_width, cfg.activation) if shared_width > 0 else None

        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("routed_slots", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("tokens_without_expert", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("router_entropy_sum", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("router_prob_sum", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.register_buffer("coactivation", torch.zeros(E, E, dtype=torch.int64), persistent=False)
        num_aux = len(self.AUX_LOSS_NAMES)
        self.register_buffer("aux_loss_sum", torch.zeros(num_aux), persistent=False)
        self.register_buffer("aux_loss_count", torch.zeros(num_aux, dtype=torch.int64), persistent=False)
        self.register_buffer("token_expert", torch.zeros(0, E, dtype=torch.int64), persistent=False)
        self.register_buffer("token_counts", torch.zeros(0, dtype=torch.int64), persistent=False)
        self._observed_ids: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for each projection."""
        nn.init.uniform_(self.w_in, -self.w_in.shape[1] ** -0.5, self.w_in.shape[1] ** -0.5)
        nn.init.uniform_(self.w_out, -self.w_out.shape[1] ** -0.5, self.w_out.shape[1] ** -0.5)

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = gate_logits(x_TD, self.gate.weight, self.gate.bias)
        routing = self.router(logits_TE)
        mask_TK = routing.mask_TK
        if self.training and self.cfg.capacity_factor is not None:
            capacity = math.ceil(self.cfg.capacity_factor * B * L * self.top_k / self.num_experts)
            mask_TK = apply_capacity(routing.expert_ids_TK, routing.mask_TK, self.num_experts, capacity)
        if self.expert_groups is not None:  # this rank holds E/P experts: all-to-all to the others'
            y_TD = ep_moe_experts(x_TD, routing.expert_ids_TK, routing.weights_TK, mask_TK, self.w_in, self.w_out,
                                  self.cfg.activation, self.expert_groups)
        else:
            y_TD = moe_experts(
                x_TD, routing.expert_ids_TK, routing.weights_TK, mask_TK, self.w_in, self.w_out, self.cfg.activation,
                max_active_slots=self._max_active_slots(B * L),
            )
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        token_ids, self._observed_ids = self._observed_ids, None
        if self.training:
            self._update_utilization(routing, mask_TK, token_ids)
        return y_TD.view(B, L, D), routing.aux_losses

    def _max_active_slots(self, num_tokens: int) -> int | None:
        # expert-choice training routes T * E slots of which only E * capacity are kept
        if self.training and isinstance(self.router, ExpertChoiceRouter):
            return self.num_experts * expert_capacity(
                num_tokens, self.num_experts, self.top_k, self.router.cfg.capacity_factor
            )
        return None

    def track_tokens(self, vocab_size: int) -> None:
        """Allocate the token_expert (V x E) and token_counts (V) counters; observe_tokens then feeds them."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        device = self.coactivation.device
        self.token_expert = torch.zeros(vocab_size, self.num_experts, dtype=torch.int64, device=device)
        self.token_counts = torch.zeros(vocab_size, dtype=torch.int64, device=device)

    def observe_tokens(self, ids: Tensor) -> None:
        """Token ids (any shape with B*L elements) of the input of the next forward, for the token counters.

        The layer never sees token ids, so the LM's owner hands them over here; the next forward uses
        them once and forgets them. Without track_tokens they are ignored."""
        self._observed_ids = ids.reshape(-1)

    @torch.no_grad()
    def _update_utilization(self, routing: Routing, kept_TK: Tensor | None, token_ids_T: Tensor | None) -> None:
        E = self.num_experts
        T, K = routing.expert_ids_TK.shape
        ids_S = routing.expert_ids_TK.reshape(-1)
        if kept_TK is not None:
            ids_S = torch.where(kept_TK.reshape(-1), ids_S, E)
        self.tokens_per_expert += count_per_expert(ids_S, E + 1)[:E]
        routed = routing.mask_TK.sum() if routing.mask_TK is not None else ids_S.numel()
        self.routed_slots += routed
        self.dropped_tokens += routed - (ids_S < E).sum()
        self.num_tokens += T
        probs_TE = routing.probs_TE.float()
        self.router_prob_sum += probs_TE.sum(dim=0)
        if E > 1:
            entropy_T = -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1)
            self.router_entropy_sum += entropy_T.sum() / math.log(E)
        # processed-expert indicator per token (a dropped slot, sent to the sentinel column E, is cut off);
        # 0/1 entries summed in fp32 with autocast off are exact up to 2**24 tokens per batch
        active_TE = torch.zeros(T, E + 1, device=ids_S.device).scatter_(1, ids_S.view(T, K), 1.0)[:, :E]
        with torch.autocast(device_type=ids_S.device.type, enabled=False):
            self.coactivation += (active_TE.T @ active_TE).round().long()
        self.tokens_without_expert += (active_TE.sum(dim=1) == 0).sum()
        for i, name in enumerate(self.AUX_LOSS_NAMES):
            if name in routing.aux_losses:
                self.aux_loss_sum[i] += routing.aux_losses[name].detach().float()
                self.aux_loss_count[i] += 1
        V = self.token_expert.shape[0]
        if V and token_ids_T is not None:
            assert token_ids_T.numel() == T, (token_ids_T.shape, T)
            kept_S = ids_S < E
            flat_S = token_ids_T[:, None].expand(T, K).reshape(-1) * E + torch.where(kept_S, ids_S, 0)
            self.token_expert.view(-1).scatter_add_(0, flat_S, kept_S.long())
            self.token_counts.scatter_add_(0, token_ids_T, torch.ones_like(token_ids_T))

    def utilization_stats(self) -> dict[str, float | int | list[int]]:
        """Load and routing statistics since the last reset (nan where no token was seen).

        load_cv: std / mean of tokens_per_expert; max_over_mean_load: the busiest expert's load over the
        mean; drop_rate: dropped / routed slots; no_expert_rate: the fraction of tokens no expert processed;
        router_entropy: mean normalised router entropy in [0, 1]
        (per token); load_entropy: entropy of the aggregate load tokens_per_expert / total, over log E;
        aux_<name>: mean per forward call of each auxiliary loss the router produced (as weighted in the loss);
        and the router's own values (Router.stats, e.g. expert_bias: the aux-loss-free selection bias per expert)."""
        counts = self.tokens_per_expert.float()
        mean = counts.mean().item()
        routed = self.routed_slots.item()
        num_tokens = self.num_tokens.item()
        nan = float("nan")
        load_E = counts / counts.sum().clamp(min=1)
        load_entropy = -torch.special.xlogy(load_E, load_E).sum().item() / math.log(max(self.num_experts, 2))
        stats = {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "load_cv": counts.std(correction=0).item() / mean if mean > 0 else nan,
            "max_over_mean_load": counts.max().item() / mean if mean > 0 else nan,
            "drop_rate": self.dropped_tokens.item() / routed if routed > 0 else nan,
            "no_expert_rate": self.tokens_without_expert.item() / num_tokens if num_tokens > 0 else nan,
            "router_entropy": self.router_entropy_sum.item() / num_tokens if num_tokens > 0 else nan,
            "load_entropy": load_entropy if mean > 0 else nan,
            "num_tokens": num_tokens,
        }
        sums, calls = self.aux_loss_sum.tolist(), self.aux_loss_count.tolist()
        for name, total, n in zip(self.AUX_LOSS_NAMES, sums, calls):
            if n > 0:
                stats[f"aux_{name}"] = total / n
        stats.update(self.router.stats())
        return stats

    def utilization_arrays(self) -> dict[str, Tensor]:
        """Every counter as a CPU tensor (the token counters are empty unless track_tokens was called)."""
        names = ("tokens_per_expert", "dropped_tokens", "routed_slots", "tokens_without_expert", "num_tokens",
                 "router_entropy_sum", "router_prob_sum", "coactivation", "aux_loss_sum", "aux_loss_count",
                 "token_expert", "token_counts")
        return {name: getattr(self, name).detach().cpu().clone() for name in names}

    def reset_utilization(self) -> None:
        counters = (self.tokens_per_expert, self.dropped_tokens, self.routed_slots, self.tokens_without_expert,
                    self.num_tokens, self.router_entropy_sum, self.router_prob_sum, self.coactivation,
                    self.aux_loss_sum, self.aux_loss_count, self.token_expert, self.token_counts)
        for buf in counters:
            buf.zero_()
