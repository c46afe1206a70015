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


def truncated_probs(logits_BV: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """softmax(logits / temperature) restricted to the top_k tokens and to the smallest top_p nucleus, fp32."""
    logits = logits_BV.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def draw_noise(noise_BV: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill noise_BV (fp32) in place with Exp(1) draws, the randomness of one sampling step."""
    return noise_BV.exponential_(generator=generator)


def pick_token(
    logits_BV: Tensor, noise_BV: Tensor | None, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """One token per row: greedy (argmax) when temperature is 0, else a sample of truncated_probs by the
    exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (E_i / p_i are
    independent exponentials of rates p_i, and the smallest is the i-th with probability p_i). Unlike
    torch.multinomial, which validates its input with a host read, it never synchronises, so a CUDA
    graph can capture it; the noise is drawn outside (draw_noise)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = truncated_probs(logits_BV, temperature, top_k, top_p)
    # a zero draw would make 0 / 0 for a truncated token; the floor keeps those at 0
    return (probs_BV / noise_BV.clamp(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def sample_next(logits_BV: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None) -> Tensor:
    """One token per row: greedy when temperature is 0, else from the tempered, top-k/top-p truncated softmax."""
    noise_BV = None
    if temperature > 0:
        noise_BV = draw_noise(torch.empty(logits_BV.shape, device=logits_BV.device), generator)
    return pick_token(logits_BV, noise_BV, temperature, top_k, top_p)


@torch.no_grad()
def generate(
    model: LM,
    prompt_BL: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> Tensor:
    """Continue each prompt by max_new_tokens; returns (B, max_new_tokens). Recurrent: constant work per token.

    The prompt is prefilled by the parallel forward, then each token is one `model.step`. cuda_graph: None
    (auto) replays the step as a captured CUDA graph when the prompt is on a CUDA device
    (experiments.cuda_graphs.StaticDecoder), True forces that, False runs the step eagerly. Both give the
    same tokens for the same generator state.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cuda_graph is None:
        cuda_graph = prompt_BL.is_cuda
    B, L = prompt_BL.shape
    if cuda_graph:
        from experiments.cuda_graphs import StaticDecoder

        decoder = StaticDecoder(model, B, L + max_new_tokens, temperature, top_k, top_p, capture=True)
        return decoder.generate(prompt_BL, max_new_tokens, generator)
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
