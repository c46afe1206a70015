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
from experiments.decoding import generate_eager, sample_next  # noqa: F401  (sample_next: public here too)
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
    return generate_eager(model, prompt_BL, max_new_tokens, temperature, top_k, top_p, generator)


@torch.no_grad()
def generate_by_reforward(model: LM, prompt_BL: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding by re-running the whole sequence each step (quadratic); the check on `generate`."""
    seq = prompt_BL
    for _ in range(max_new_tokens):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt_BL.shape[1]:]
