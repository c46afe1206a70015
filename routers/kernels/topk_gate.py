"""Fused top-k gate: router logits -> gate probabilities -> top-k experts and weights, in one pass.

The Switch / GShard / Mixtral gate (Fedus et al. 2021; Lepikhin et al. 2020): probs = softmax(logits)
over the E experts (or sigmoid per expert), each token keeps its k most probable experts, and their
weights are renormalised over the k chosen when asked and k > 1. Reference twin: `routers.topk.topk_gate_ref`.

One program handles BLOCK_T tokens with all E experts in registers (E padded to a power of two with
-inf), so nothing leaves the chip between the softmax and the selection. Ranking is on the logits, which
the probabilities are monotone in: the same experts as torch.topk of the probabilities, except that
probabilities which round to equal values (a saturated sigmoid, an underflowed softmax) still rank by
logit; exactly equal logits go to the lower expert index, so the result is deterministic. With a selection
bias (auxiliary-loss-free balancing, DeepSeek-V3 sec. 2.1.2) the ranking is on probability + bias instead,
computed in fp32 as the reference does, ties again to the lower index; the weights stay the probabilities.
The optional per-expert counts are one int32 atomic add per expert and program (integer adds commute,
so they are deterministic too). The backward is one kernel: through the renormalisation and the
softmax / sigmoid, from the gradients of both the weights and the probabilities.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from routers.topk import GATES, Gate


@triton.jit
def _select(score_TE, free_TE, e_E, BLOCK_E: tl.constexpr):
    """The highest free score of each row, ties to the lower index: (pick_T, hit_TE, free_TE after).
    A row with no comparable score (NaN) takes its lowest free expert, so ids stay valid and distinct."""
    best_T = tl.max(tl.where(free_TE, score_TE, float("-inf")), axis=1)
    pick_T = tl.min(tl.where(free_TE & (score_TE == best_T[:, None]), e_E[None, :], BLOCK_E), axis=1)
    pick_T = tl.where(pick_T < BLOCK_E, pick_T, tl.min(tl.where(free_TE, e_E[None, :], BLOCK_E), axis=1))
    hit_TE = e_E[None, :] == pick_T[:, None]
    return pick_T, hit_TE, free_TE & (e_E[None, :] != pick_T[:, None])


@triton.jit
def _gate_probs(x_TE, SIGMOID: tl.constexpr):
    if SIGMOID:
        return tl.sigmoid(x_TE)
    m_T = tl.max(x_TE, axis=1)
    p_TE = tl.exp(x_TE - m_T[:, None])
    return p_TE / tl.sum(p_TE, axis=1)[:, None]


@triton.jit
def _topk_gate_fwd(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, probs_ptr, counts_ptr, T, E,
    K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, COUNTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t_T = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_E = tl.arange(0, BLOCK_E)
    k_K = tl.arange(0, BLOCK_K)
    row_T = t_T < T
    col_E = e_E < E
    mask_TE = row_T[:, None] & col_E[None, :]
    x_TE = tl.load(logits_ptr + t_T[:, None] * E + e_E[None, :], mask=mask_TE, other=0.0)
    x_TE = tl.where(col_E[None, :], x_TE, float("-inf"))  # padded experts; padded tokens stay finite
    p_TE = _gate_probs(x_TE, SIGMOID)
    tl.store(probs_ptr + t_T[:, None] * E + e_E[None, :], p_TE, mask=mask_TE)
    if HAS_BIAS:
        b_E = tl.load(bias_ptr + e_E, mask=col_E, other=0.0)
        score_TE = tl.where(col_E[None, :], p_TE + b_E[None, :], float("-inf"))
    else:
        score_TE = x_TE

    free_TE = tl.broadcast_to(col_E[None, :], (BLOCK_T, BLOCK_E))
    w_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    counts_E = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for k in tl.static_range(K):
        pick_T, hit_TE, free_TE = _select(score_TE, free_TE, e_E, BLOCK_E)
        w_T = tl.sum(tl.where(hit_TE, p_TE, 0.0), axis=1)
        w_TK = tl.where(k_K[None, :] == k, w_T[:, None], w_TK)
        ids_TK = tl.where(k_K[None, :] == k, pick_T[:, None], ids_TK)
        if COUNTS:
            counts_E += tl.sum((hit_TE & row_T[:, None]).to(tl.int32), axis=0)
    if RENORMALIZE:
        w_TK = w_TK / tl.sum(w_TK, axis=1)[:, None]
    mask_TK = row_T[:, None] & (k_K[None, :] < K)
    tl.store(weights_ptr + t_T[:, None] * K + k_K[None, :], w_TK, mask=mask_TK)
    tl.store(ids_ptr + t_T[:, None] * K + k_K[None, :], ids_TK.to(tl.int64), mask=mask_TK)
    if COUNTS:
        tl.atomic_add(counts_ptr + e_E, counts_E, mask=col_E)


@triton.jit
def _topk_gate_bwd(
    probs_ptr, ids_ptr, weights_ptr, dweights_ptr, dprobs_ptr, dlogits_ptr, T, E,
    K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_DWEIGHTS: tl.constexpr, HAS_DPROBS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    t_T = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_E = tl.arange(0, BLOCK_E)
    row_T = t_T < T
    mask_TE = row_T[:, None] & (e_E < E)[None, :]
    offs_TE = t_T[:, None] * E + e_E[None, :]
    p_TE = tl.load(probs_ptr + offs_TE, mask=mask_TE, other=0.0)
    if HAS_DPROBS:
        g_TE = tl.load(dprobs_ptr + offs_TE, mask=mask_TE, other=0.0)
    else:
        g_TE = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_DWEIGHTS:
        # w_k = r_k / S with r_k the chosen probabilities and S their sum: dr_j = (dw_j - sum_k dw_k w_k) / S
        c_T = tl.zeros((BLOCK_T,), dtype=tl.float32)
        s_T = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if RENORMALIZE:
            for k in tl.static_range(K):
                id_T = tl.load(ids_ptr + t_T * K + k, mask=row_T, other=0)
                dw_T = tl.load(dweights_ptr + t_T * K + k, mask=row_T, other=0.0)
                w_T = tl.load(weights_ptr + t_T * K + k, mask=row_T, other=0.0)
                c_T += dw_T * w_T
                s_T += tl.sum(tl.where(e_E[None, :] == id_T[:, None], p_TE, 0.0), axis=1)
            s_T = tl.where(row_T, s_T, 1.0)
        for k in tl.static_range(K):
            id_T = tl.load(ids_ptr + t_T * K + k, mask=row_T, other=0)
            dw_T = tl.load(dweights_ptr + t_T * K + k, mask=row_T, other=0.0)
            if RENORMALIZE:
                dw_T = (dw_T - c_T) / s_T
            g_TE += tl.where(e_E[None, :] == id_T[:, None], dw_T[:, None], 0.0)
    if SIGMOID:
        dx_TE = g_TE * p_TE * (1.0 - p_TE)
    else:
        dx_TE = p_TE * (g_TE - tl.sum(p_TE * g_TE, axis=1)[:, None])
    tl.store(dlogits_ptr + offs_TE, dx_TE, mask=mask_TE)


def _blocks(T: int, E: int) -> tuple[int, int]:
    # about 2048 gate entries per program: E = 8 gives 128 tokens, so T = 16384 fills an H200's 132 SMs
    BLOCK_E = triton.next_power_of_2(E)
    return min(max(2048 // BLOCK_E, 1), 128, triton.next_power_of_2(T)), BLOCK_E


class _TopKGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE: Tensor, k: int, sigmoid: bool, renormalize: bool, with_counts: bool,
                bias_E: Tensor | None):
        T, E = logits_TE.shape
        logits_TE = logits_TE.contiguous()
        weights_TK = logits_TE.new_empty(T, k)
        ids_TK = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
        probs_TE = torch.empty_like(logits_TE)
        counts_E = torch.zeros(E if with_counts else 1, dtype=torch.int32, device=logits_TE.device)
        BLOCK_T, BLOCK_E = _blocks(T, E)
        bias_E = bias_E.detach().float().contiguous() if bias_E is not None else None
        _topk_gate_fwd[(triton.cdiv(T, BLOCK_T),)](
            logits_TE, bias_E if bias_E is not None else logits_TE, weights_TK, ids_TK, probs_TE, counts_E, T, E,
            K=k, SIGMOID=sigmoid, RENORMALIZE=renormalize, COUNTS=with_counts, HAS_BIAS=bias_E is not None,
            BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(k),
        )
        ctx.save_for_backward(probs_TE, ids_TK, weights_TK)
        ctx.options = (k, sigmoid, renormalize)
        ctx.mark_non_differentiable(ids_TK, counts_E)
        ctx.set_materialize_grads(False)
        return weights_TK, ids_TK, probs_TE, counts_E

    @staticmethod
    def backward(ctx, dweights_TK: Tensor | None, _dids, dprobs_TE: Tensor | None, _dcounts):
        if dweights_TK is None and dprobs_TE is None:
            return None, None, None, None, None, None
        probs_TE, ids_TK, weights_TK = ctx.saved_tensors
        k, sigmoid, renormalize = ctx.options
        T, E = probs_TE.shape
        dlogits_TE = torch.empty_like(probs_TE)
        BLOCK_T, BLOCK_E = _blocks(T, E)
        _topk_gate_bwd[(triton.cdiv(T, BLOCK_T),)](
            probs_TE, ids_TK, weights_TK,
            dweights_TK.contiguous() if dweights_TK is not None else probs_TE,
            dprobs_TE.contiguous() if dprobs_TE is not None else probs_TE,
            dlogits_TE, T, E,
            K=k, SIGMOID=sigmoid, RENORMALIZE=renormalize,
            HAS_DWEIGHTS=dweights_TK is not None, HAS_DPROBS=dprobs_TE is not None,
            BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
        )
        return dlogits_TE, None, None, None, None, None


@torch.compiler.disable  # torch.compile does not trace into Triton autotuners: a graph break
def topk_gate(
    logits_TE: Tensor, k: int, gate: str = "softmax", renormalize: bool = True, with_counts: bool = False,
    bias_E: Tensor | None = None,
) -> Gate:
    """Fused gate for logits_TE (T, E) fp32 on a CUDA device (or the CPU under TRITON_INTERPRET=1).

    probs_TE (T, E) fp32 = softmax over experts or sigmoid per expert (`gate`); expert_ids_TK (T, k) int64,
    the k highest (of probs_TE + bias_E when a selection bias (E,) is given), in decreasing order, ties to
    the lower index; weights_TK (T, k) fp32, their
    probabilities, divided by their sum when `renormalize` and k > 1; counts_E (E,) int32, how many of the
    T * k slots chose each expert, when `with_counts` (else None). Differentiable in logits_TE through
    weights_TK and probs_TE. No host synchronisation: one launch forward, one backward.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if logits_TE.dim() != 2 or logits_TE.dtype != torch.float32:
        raise ValueError(f"logits_TE must be a (T, E) fp32 tensor, got {tuple(logits_TE.shape)} {logits_TE.dtype}")
    if not 1 <= k <= logits_TE.shape[1]:
        raise ValueError(f"k must be in [1, E={logits_TE.shape[1]}], got {k}")
    if bias_E is not None and bias_E.shape != (logits_TE.shape[1],):
        raise ValueError(f"bias_E must have shape ({logits_TE.shape[1]},), got {tuple(bias_E.shape)}")
    weights_TK, ids_TK, probs_TE, counts_E = _TopKGate.apply(
        logits_TE, k, gate == "sigmoid", renormalize and k > 1, with_counts, bias_E
    )
    return Gate(weights_TK, ids_TK, probs_TE, counts_E if with_counts else None)
