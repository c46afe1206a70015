"""Sampling from a trained LM with its recurrent cache: prefill the prompt once, then O(1) steps."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from blocks.model import LM
from experiments.build import build_model
from experiments.checkpoint import CheckpointError, load_checkpoint


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[LM, dict]:
    """The model saved in a checkpoint (loaded with weights_only=True), in eval mode, and the checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["run_config"])
    model = build_model(cfg, ckpt["vocab_size"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), ckpt


def sample_next(logits_BV: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None) -> Tensor:
    """One token per row: greedy when temperature is 0, else from the tempered, top-k/top-p truncated softmax."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: LM,
    prompt_BL: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt by max_new_tokens; returns (B, max_new_tokens). Recurrent: constant work per token."""
    B, L = prompt_BL.shape
    cache = model.allocate_cache(B, L + max_new_tokens, device=prompt_BL.device)
    logits_BLV, _ = model(prompt_BL, cache)
    next_B = sample_next(logits_BLV[:, -1], temperature, top_k, top_p, generator)
    out = [next_B]
    for _ in range(max_new_tokens - 1):
        next_B = sample_next(model.step(next_B, cache), temperature, top_k, top_p, generator)
        out.append(next_B)
    return torch.stack(out, dim=1)


@torch.no_grad()
def generate_by_reforward(model: LM, prompt_BL: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding by re-running the whole sequence each step (quadratic); the check on `generate`."""
    seq = prompt_BL
    for _ in range(max_new_tokens):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt_BL.shape[1]:]
