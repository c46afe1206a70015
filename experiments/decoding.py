"""Decoding that needs no checkpoint machinery: the sampling rule and the plain recurrent loop.

Kept apart from experiments.generation (which loads checkpoints) so that benchmarks and the CUDA-graph
decoder (experiments.cuda_graphs) import only torch and blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blocks.model import LM


def truncated_probs(logits_BV: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """softmax(logits / temperature) restricted to the top_k tokens and, within those, to the smallest top_p
    nucleus, fp32. With top_k the nucleus is found among the k sorted candidates only (no sort of the vocabulary)."""
    logits = logits_BV.float() / temperature
    if top_k:
        vals, idx = _top_k_candidates(logits, min(top_k, logits.shape[-1]), top_p)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)
    elif top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(_outside_nucleus(sorted_logits, top_p), float("-inf")))
    return logits.softmax(dim=-1)


def _top_k_candidates(logits_BV: Tensor, k: int, top_p: float | None) -> tuple[Tensor, Tensor]:
    """The k largest (tempered) logits, largest first, with those past the top_p nucleus among them set to
    -inf, and their token ids."""
    vals_BK, idx_BK = torch.topk(logits_BV, k, dim=-1)
    if top_p is not None and top_p < 1.0:
        vals_BK = vals_BK.masked_fill(_outside_nucleus(vals_BK, top_p), float("-inf"))
    return vals_BK, idx_BK


def _outside_nucleus(sorted_logits: Tensor, top_p: float) -> Tensor:
    """For logits sorted largest first: True past the smallest prefix whose probability mass reaches top_p."""
    probs = sorted_logits.softmax(dim=-1)
    return probs.cumsum(dim=-1) - probs > top_p


def noise_width(vocab: int, top_k: int | None) -> int:
    """Noise draws a row needs: one per top-k candidate with top_k (no other token can be picked), else one
    per vocabulary entry."""
    return min(top_k, vocab) if top_k else vocab


def draw_noise(noise_BN: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill noise_BN (fp32, noise_width columns) in place with Exp(1) draws, the randomness of one sampling step."""
    return noise_BN.exponential_(generator=generator)


def pick_token(
    logits_BV: Tensor, noise_BN: Tensor | None, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """One token per row: greedy (argmax) when temperature is 0, else a sample of truncated_probs by the
    exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (E_i / p_i are
    independent exponentials of rates p_i, and the smallest is the i-th with probability p_i). Unlike
    torch.multinomial, which validates its input with a host read, it never synchronises, so a CUDA
    graph can capture it; the noise is drawn outside (draw_noise). With top_k the race runs among the k
    candidates alone (their own k draws): every other token has p_i = 0 and cannot win, so nothing the size of
    the vocabulary is formed after the top-k."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    # a zero draw would make 0 / 0 for a truncated token; the floor keeps those at 0
    tiny = torch.finfo(torch.float32).tiny
    if top_k:
        k = noise_width(logits_BV.shape[-1], top_k)
        if noise_BN.shape[-1] != k:
            raise ValueError(f"top_k={top_k} sampling takes {k} noise draws a row, got {noise_BN.shape[-1]}")
        vals_BK, idx_BK = _top_k_candidates(logits_BV.float() / temperature, k, top_p)
        won_B1 = (vals_BK.softmax(dim=-1) / noise_BN.clamp(min=tiny)).argmax(dim=-1, keepdim=True)
        return idx_BK.gather(-1, won_B1)[:, 0]
    probs_BV = truncated_probs(logits_BV, temperature, top_k, top_p)
    return (probs_BV / noise_BN.clamp(min=tiny)).argmax(dim=-1)


def sample_next(logits_BV: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None) -> Tensor:
    """One token per row: greedy when temperature is 0, else from the tempered, top-k/top-p truncated softmax."""
    noise_BN = None
    if temperature > 0:
        width = noise_width(logits_BV.shape[-1], top_k)
        noise_BN = draw_noise(torch.empty(logits_BV.shape[0], width, device=logits_BV.device), generator)
    return pick_token(logits_BV, noise_BN, temperature, top_k, top_p)


@torch.no_grad()
def generate_eager(
    model: LM,
    prompt_BL: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The plain path of experiments.generation.generate: prefill, then one eager `model.step` per token."""
    B, L = prompt_BL.shape
    cache = model.allocate_cache(B, L + max_new_tokens, device=prompt_BL.device)
    logits_BLV, _ = model(prompt_BL, cache)
    next_B = sample_next(logits_BLV[:, -1], temperature, top_k, top_p, generator)
    out = [next_B]
    for _ in range(max_new_tokens - 1):
        next_B = sample_next(model.step(next_B, cache), temperature, top_k, top_p, generator)
        out.append(next_B)
    return torch.stack(out, dim=1)
