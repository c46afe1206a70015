"""Sampling from a trained LM with its recurrent cache: prefill the prompt once, then O(1) steps."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from blocks.model import LM
from experiments import export, hf_mamba, released
from experiments.build import build_model
from experiments.checkpoint import CheckpointError, load_checkpoint
from experiments.weights import WEIGHT_FILES, read_config, resolve

# Folder kinds: name -> (does a config.json describe it, loader(folder, config) -> (model, info)).
FOLDER_KINDS = {
    export.KIND: (export.is_export, export.load_export),
    released.KIND: (released.is_blackmamba, released.load_blackmamba),
    hf_mamba.KIND: (hf_mamba.is_hf_mamba, hf_mamba.load_hf_mamba),
}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[LM, dict]:
    """The model in any supported checkpoint, in eval mode, and what describes it (run_config, vocab_size, ...).

    `path`: a Lightning checkpoint of a training run (the checkpoint dict is returned with the model), or a
    folder, a file in one, or a Hugging Face hub id holding one of FOLDER_KINDS: the platform's safetensors
    export (experiments.export), a released Zyphra BlackMamba (experiments.released) or a Hugging Face Mamba
    (experiments.hf_mamba). Nothing is unpickled: .ckpt and .bin files are read with weights_only=True.
    """
    file = Path(path).expanduser()
    if not file.is_file() or file.name in (*WEIGHT_FILES, "config.json") or file.suffix == ".safetensors":
        return _load_folder(str(path), device)
    ckpt = load_checkpoint(file)
    cfg = OmegaConf.create(ckpt["run_config"])
    model = build_model(cfg, ckpt["vocab_size"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), ckpt


def _load_folder(ref: str, device: str | torch.device) -> tuple[LM, dict]:
    if ref.endswith(".ckpt") and not Path(ref).expanduser().exists():
        raise CheckpointError(f"checkpoint not found: {ref}")
    folder = resolve(ref)
    config = read_config(folder)
    for kind, (describes, loader) in FOLDER_KINDS.items():
        if describes(config):
            model, info = loader(folder, config)
            return model.to(device).eval(), info
    raise CheckpointError(f"{folder}/config.json describes no checkpoint kind this platform reads "
                          f"({', '.join(FOLDER_KINDS)})")


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
