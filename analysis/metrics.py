"""Utilization metrics as pure functions on numpy arrays (no torch, no MLflow).

Shapes: T tokens, K slots per token, E experts, L layers, V vocabulary. Counts are slots an expert processed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np


def load_cv(counts: np.ndarray) -> np.ndarray | float:
    """Coefficient of variation std / mean of the load over the last axis (population std); 0 = balanced."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, counts.std(axis=-1) / mean, np.nan)[()]


def max_over_mean(counts: np.ndarray) -> np.ndarray | float:
    """The busiest expert's load over the mean load (last axis); 1 = balanced, E = all on one expert."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, counts.max(axis=-1) / mean, np.nan)[()]


def normalized_entropy(weights: np.ndarray) -> np.ndarray | float:
    """Entropy of weights / sum(weights) over the last axis, divided by log E: 1 = uniform, 0 = one expert."""
    w = np.asarray(weights, dtype=np.float64)
    E = w.shape[-1]
    total = w.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(total > 0, w / total, np.nan)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return (-plogp.sum(axis=-1) / math.log(E) if E > 1 else np.full(w.shape[:-1], np.nan))[()]


def load_entropy(counts: np.ndarray) -> np.ndarray | float:
    """Normalised entropy of the aggregate load counts / total (what MoE.utilization_stats calls load_entropy)."""
    return normalized_entropy(counts)


def token_entropy(probs_TE: np.ndarray) -> np.ndarray:
    """Normalised entropy of each token's router distribution, (T,); its mean is the logged router_entropy."""
    return normalized_entropy(probs_TE)


def relative_load(counts: np.ndarray) -> np.ndarray:
    """Load over the uniform load (the mean over experts, last axis): 1 everywhere when balanced."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, counts / mean, np.nan)


def coactivation(expert_ids_TK: np.ndarray, num_experts: int, mask_TK: np.ndarray | None = None) -> np.ndarray:
    """(E, E) counts: entry (i, j) = tokens whose active experts include both i and j; diagonal = load of i.

    The same quantity as MoE.coactivation, from a routing table (e.g. a hand-built one, or recorded ids
    with -1 for empty slots)."""
    ids = np.asarray(expert_ids_TK)
    keep = ids >= 0 if mask_TK is None else np.asarray(mask_TK) & (ids >= 0)
    active_TE = np.zeros((ids.shape[0], num_experts), dtype=np.int64)
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
    active_TE[rows[keep], ids[keep]] = 1
    return active_TE.T @ active_TE


def coactivation_conditional(co_EE: np.ndarray) -> np.ndarray:
    """P(expert j active | expert i active) = co[i, j] / co[i, i] (rows of unused experts are nan)."""
    co = np.asarray(co_EE, dtype=np.float64)
    diag = np.diag(co)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(diag > 0, co / diag, np.nan)


def routing_agreement(ids_TK: np.ndarray, reference_TK: np.ndarray) -> float:
    """Mean over tokens of |experts(t) & reference experts(t)| / |reference experts(t)|; -1 marks an empty slot.

    OLMoE's router saturation (Muennighoff et al. 2024, sec. 5.2) with the final checkpoint as reference:
    1 = the same top-k sets, about K/E for unrelated routing. Tokens with no reference expert are skipped."""
    a, ref = np.asarray(ids_TK), np.asarray(reference_TK)
    if a.shape[0] != ref.shape[0]:
        raise ValueError(f"routings cover different tokens: {a.shape[0]} vs {ref.shape[0]}")
    E = int(max(a.max(initial=-1), ref.max(initial=-1))) + 1

    def indicator(ids):
        out = np.zeros((ids.shape[0], E + 1), dtype=bool)
        out[np.arange(ids.shape[0])[:, None], np.where(ids >= 0, ids, E)] = True
        return out[:, :E]

    in_a, in_ref = indicator(a), indicator(ref)
    n_ref = in_ref.sum(axis=1)
    used = n_ref > 0
    if not used.any():
        return float("nan")
    return float(((in_a & in_ref).sum(axis=1)[used] / n_ref[used]).mean())


def expert_given_token(token_expert_VE: np.ndarray, token_counts_V: np.ndarray | None = None) -> np.ndarray:
    """P(expert e processed token v): token_expert[v, e] / occurrences of v (token_counts), or, without
    token_counts, the share of v's processed slots that went to e. Rows of unseen tokens are nan."""
    counts = np.asarray(token_expert_VE, dtype=np.float64)
    total = counts.sum(axis=1) if token_counts_V is None else np.asarray(token_counts_V, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[:, None] > 0, counts / total[:, None], np.nan)


def top_tokens(token_expert_VE: np.ndarray, k: int = 10,
               token_counts_V: np.ndarray | None = None) -> list[list[tuple[int, int, float, float]]]:
    """For each expert, its k most frequent tokens as (token id, count, share of the expert's load,
    P(expert | token)), most frequent first. The share tells what the expert spends its capacity on,
    P(expert | token) how exclusively it takes that token (OLMoE's token specialisation, sec. 5.4)."""
    counts = np.asarray(token_expert_VE, dtype=np.int64)
    given = expert_given_token(counts, token_counts_V)
    out = []
    for e in range(counts.shape[1]):
        load = counts[:, e].sum()
        order = np.argsort(-counts[:, e], kind="stable")[:k]
        out.append([(int(v), int(counts[v, e]), counts[v, e] / load if load else 0.0, float(given[v, e]))
                    for v in order if counts[v, e] > 0])
    return out


def byte_label(token_id: int) -> str:
    """A readable label for a byte-level token: the character, or an escape for whitespace and control bytes."""
    special = {9: "\\t", 10: "\\n", 13: "\\r", 32: "' '"}
    if token_id in special:
        return special[token_id]
    if 33 <= token_id < 127:
        return chr(token_id)
    return f"0x{token_id:02x}"


def top_tokens_table(token_expert_VE: np.ndarray, k: int = 8, label: Callable[[int], str] = byte_label,
                     token_counts_V: np.ndarray | None = None) -> str:
    """top_tokens as text, one line per expert: `e3 (12.5% of slots): e 9.1% (p=0.62), ...`."""
    counts = np.asarray(token_expert_VE)
    total = counts.sum()
    lines = []
    for e, tokens in enumerate(top_tokens(counts, k, token_counts_V)):
        share = counts[:, e].sum() / total if total else 0.0
        items = ", ".join(f"{label(v)} {frac:.1%} (p={p:.2f})" for v, _, frac, p in tokens)
        lines.append(f"e{e} ({share:.1%} of slots): {items or '-'}")
    return "\n".join(lines)


def layer_summary(arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Scalar statistics of one layer's raw counters (a snapshot's <layer>/* arrays without the prefix),
    the same definitions as MoE.utilization_stats: load_cv, max_over_mean_load, load_entropy,
    router_entropy, drop_rate, no_expert_rate (snapshots that count tokens_without_expert), and aux_<name> for
    the auxiliary losses counted (given aux_names)."""
    counts = arrays["tokens_per_expert"]
    num_tokens, routed = float(arrays["num_tokens"]), float(arrays["routed_slots"])
    out = {
        "load_cv": float(load_cv(counts)),
        "max_over_mean_load": float(max_over_mean(counts)),
        "load_entropy": float(load_entropy(counts)),
        "router_entropy": float(arrays["router_entropy_sum"]) / num_tokens if num_tokens else math.nan,
        "drop_rate": float(arrays["dropped_tokens"]) / routed if routed else math.nan,
    }
    if "tokens_without_expert" in arrays:
        out["no_expert_rate"] = float(arrays["tokens_without_expert"]) / num_tokens if num_tokens else math.nan
    for name, total, count in zip(arrays.get("aux_names", ()), arrays.get("aux_loss_sum", ()), arrays.get("aux_loss_count", ())):
        if count > 0:
            out[f"aux_{name}"] = float(total) / float(count)
    return out
