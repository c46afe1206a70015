"""Fused Sinkhorn routing (BlackMamba, Anthony et al. 2024, arXiv 2402.01771, sec. 3.1): the experts of
each token are the top-k of the balanced plan `routers.sinkhorn.sinkhorn_log_plan`; reference twin
`routers.sinkhorn.sinkhorn_topk_ref`.

In the log domain, with log K = logits / temperature, each iteration is a row scaling
    log d0_t = -log T - logsumexp_e(log K_te + log d1_e)
and a column scaling
    log d1_e = -log E - logsumexp_t(log K_te + log d0_t),
starting from log d1_e = -log E - logsumexp_t(log K_te). The column log-sum-exps reduce over all T
tokens, so each iteration is one launch over a fixed grid of P <= 128 programs: a program first combines
the P column partials of the previous launch into log d1 (every program redundantly, in the same
order, which costs P * E loads and saves a separate combine launch), then scales its rows and writes the
log-sum-exp of its rows for each column. The last launch combines the partials once more and ranks
log K_te + log d1_e per token (the plan less the row constant log d0_t, so the same order), on the
same grid. With T = 16384 and E <= 64 each program holds one block of 128 tokens, so a launch is one
load of the partials and one of the logits (both L2-resident after the first launch).
n_iters + 2 launches, no host synchronisation, no float atomics: the result is deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting
from routers.kernels.topk_gate import _select

_MAX_PROGRAMS = 128  # about one per SM of an H200; bounds the P * E combine every program repeats
_BLOCK_ELEMENTS = 8192  # plan entries (and partials) a program holds at once


@triton.jit
def _log_d1(lse_ptr, P, E, log_E, e_E, col_E, CHUNK_P: tl.constexpr):
    """log d1_e = -log E - logsumexp over the P programs' column partials lse_PE (row-major (P, E))."""
    m_E = tl.where(col_E, float("-inf"), 0.0)  # online log-sum-exp; 0 keeps padded experts finite
    s_E = tl.where(col_E, 0.0, 1.0)
    for p0 in range(0, P, CHUNK_P):
        p_P = p0 + tl.arange(0, CHUNK_P)
        mask_PE = (p_P < P)[:, None] & col_E[None, :]
        lse_PE = tl.load(lse_ptr + p_P[:, None] * E + e_E[None, :], mask=mask_PE, other=float("-inf"))
        m_new_E = tl.maximum(m_E, tl.max(lse_PE, axis=0))
        s_E = s_E * tl.exp(m_E - m_new_E) + tl.sum(tl.exp(lse_PE - m_new_E[None, :]), axis=0)
        m_E = m_new_E
    return tl.where(col_E, -log_E - (m_E + tl.log(s_E)), float("-inf"))


@triton.jit
def _load_log_k(logits_ptr, t_T, e_E, row_T, col_E, T, E, temperature):
    x_TE = tl.load(logits_ptr + t_T[:, None] * E + e_E[None, :], mask=row_T[:, None] & col_E[None, :], other=0.0)
    return tl.where(col_E[None, :], x_TE / temperature, float("-inf"))  # padded tokens stay finite


@triton.jit
def _sinkhorn_step(
    logits_ptr, lse_in_ptr, lse_out_ptr, T, E, P, rows_per_program, temperature, log_T, log_E,
    FIRST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_P: tl.constexpr,
):
    """Column partials of log K + log d0 over this program's rows (log d0 = 0 in the FIRST launch)."""
    pid = tl.program_id(0)
    e_E = tl.arange(0, BLOCK_E)
    col_E = e_E < E
    if FIRST:
        log_d1_E = tl.zeros((BLOCK_E,), dtype=tl.float32)
    else:
        log_d1_E = _log_d1(lse_in_ptr, P, E, log_E, e_E, col_E, CHUNK_P)
    m_E = tl.where(col_E, float("-inf"), 0.0)  # online log-sum-exp per column, as in _log_d1
    s_E = tl.where(col_E, 0.0, 1.0)
    for t0 in range(0, rows_per_program, BLOCK_T):
        t_T = pid.to(tl.int64) * rows_per_program + t0 + tl.arange(0, BLOCK_T)
        row_T = t_T < T
        log_k_TE = _load_log_k(logits_ptr, t_T, e_E, row_T, col_E, T, E, temperature)
        if FIRST:
            v_TE = log_k_TE
        else:
            x_TE = log_k_TE + log_d1_E[None, :]
            mx_T = tl.max(x_TE, axis=1)
            log_d0_T = -log_T - (mx_T + tl.log(tl.sum(tl.exp(x_TE - mx_T[:, None]), axis=1)))
            v_TE = log_k_TE + log_d0_T[:, None]
        v_TE = tl.where(row_T[:, None], v_TE, float("-inf"))
        m_new_E = tl.maximum(m_E, tl.max(v_TE, axis=0))
        s_E = s_E * tl.exp(m_E - m_new_E) + tl.sum(tl.exp(v_TE - m_new_E[None, :]), axis=0)
        m_E = m_new_E
    tl.store(lse_out_ptr + pid * E + e_E, m_E + tl.log(s_E), mask=col_E)


@triton.jit
def _sinkhorn_select(
    logits_ptr, lse_ptr, ids_ptr, T, E, P, rows_per_program, temperature, log_E,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_P: tl.constexpr,
):
    """expert_ids_TK = top-k over e of log K_te + log d1_e, ties to the lower expert index."""
    pid = tl.program_id(0)
    e_E = tl.arange(0, BLOCK_E)
    k_K = tl.arange(0, BLOCK_K)
    col_E = e_E < E
    log_d1_E = _log_d1(lse_ptr, P, E, log_E, e_E, col_E, CHUNK_P)
    for t0 in range(0, rows_per_program, BLOCK_T):
        t_T = pid.to(tl.int64) * rows_per_program + t0 + tl.arange(0, BLOCK_T)
        row_T = t_T < T
        score_TE = _load_log_k(logits_ptr, t_T, e_E, row_T, col_E, T, E, temperature) + log_d1_E[None, :]
        free_TE = tl.broadcast_to(col_E[None, :], (BLOCK_T, BLOCK_E))
        ids_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for k in tl.static_range(K):
            pick_T, _, free_TE = _select(score_TE, free_TE, e_E, BLOCK_E)
            ids_TK = tl.where(k_K[None, :] == k, pick_T[:, None], ids_TK)
        mask_TK = row_T[:, None] & (k_K[None, :] < K)
        tl.store(ids_ptr + t_T[:, None] * K + k_K[None, :], ids_TK.to(tl.int64), mask=mask_TK)


@torch.compiler.disable  # torch.compile does not trace into Triton autotuners: a graph break
def sinkhorn_topk(logits_TE: Tensor, k: int, temperature: float = 0.5, n_iters: int = 8) -> Tensor:
    """expert_ids_TK (T, k) int64: the k experts of each token under the Sinkhorn plan of logits_TE (T, E)
    fp32 on a CUDA device (or the CPU under TRITON_INTERPRET=1), best first, ties to the lower index;
    the same as torch.topk(sinkhorn_log_plan(logits_TE, temperature, n_iters), k).indices up to ties.
    No gradient (the plan only picks experts). Batch-global: every token's choice depends on all T."""
    if logits_TE.dim() != 2 or logits_TE.dtype != torch.float32:
        raise ValueError(f"logits_TE must be a (T, E) fp32 tensor, got {tuple(logits_TE.shape)} {logits_TE.dtype}")
    T, E = logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    logits_TE = logits_TE.detach().contiguous()
    BLOCK_E = triton.next_power_of_2(E)
    # one block of rows per program where it fits (T = 16384: 128 programs of 128 tokens for E <= 64),
    # since the launches are latency-bound; the interpreter is fastest with few programs
    rows = max(triton.next_power_of_2(triton.cdiv(T, _MAX_PROGRAMS)), 128 if interpreting() else 32)
    BLOCK_T = min(rows, max(_BLOCK_ELEMENTS // BLOCK_E, 1))
    rows_per_program = triton.cdiv(triton.cdiv(T, BLOCK_T), _MAX_PROGRAMS) * BLOCK_T
    P = triton.cdiv(T, rows_per_program)
    CHUNK_P = min(max(_BLOCK_ELEMENTS // BLOCK_E, 1), triton.next_power_of_2(P))
    num_warps = 16 if BLOCK_T * BLOCK_E >= 8192 else 8 if BLOCK_T * BLOCK_E >= 4096 else 4  # no spills on sm_90
    lse_in_PE, lse_out_PE = torch.empty(2, P, E, dtype=torch.float32, device=logits_TE.device)  # ping-pong
    log_T, log_E = math.log(T), math.log(E)
    for i in range(n_iters + 1):
        _sinkhorn_step[(P,)](
            logits_TE, lse_in_PE, lse_out_PE, T, E, P, rows_per_program, temperature, log_T, log_E,
            FIRST=i == 0, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, CHUNK_P=CHUNK_P, num_warps=num_warps,
        )
        lse_in_PE, lse_out_PE = lse_out_PE, lse_in_PE
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    _sinkhorn_select[(P,)](
        logits_TE, lse_in_PE, ids_TK, T, E, P, rows_per_program, temperature, log_E,
        K=k, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(k), CHUNK_P=CHUNK_P,
        num_warps=num_warps,
    )
    return ids_TK
