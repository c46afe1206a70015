"""Hugging Face Mamba checkpoints (transformers' MambaForCausalLM: state-spaces/mamba-130m-hf ... mamba-2.8b-hf).

A folder (or hub id) with config.json (model_type "mamba": hidden_size, num_hidden_layers, vocab_size,
state_size, expand, conv_kernel, use_bias, use_conv_bias, hidden_act, layer_norm_epsilon, time_step_rank,
tie_word_embeddings; absent fields take transformers' defaults) and model.safetensors (or sharded, or
pytorch_model.bin). It loads into the dense Mamba stack (model.mlp=none: mixer blocks only), whose mixer
parameters have the same names:

    backbone.embeddings.weight (older files: backbone.embedding.weight)  -> embedding.weight
    backbone.layers.i.norm.weight                                         -> layers.i.norm.weight (RMSNorm)
    backbone.layers.i.mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,out_proj}.*  -> layers.i.mixer.*
    backbone.norm_f.weight                                                -> norm_f.weight (RMSNorm)
    lm_head.weight: ignored when tie_word_embeddings (transformers ties it to the embedding), else the head
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from blocks.model import LM, ModelConfig
from experiments.build import build_model
from experiments.checkpoint import CheckpointError
from experiments.released import TOKENIZER
from experiments.weights import StateMapper, folder_tokenizer, read_config, read_weights, run_config

KIND = "hf-mamba"
DEFAULTS = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=32, state_size=16, expand=2, conv_kernel=4,
                use_bias=False, use_conv_bias=True, hidden_act="silu", layer_norm_epsilon=1e-5,
                time_step_rank="auto", tie_word_embeddings=True)  # transformers' MambaConfig defaults


def is_hf_mamba(config: dict) -> bool:
    return config.get("model_type") == "mamba" or "MambaForCausalLM" in config.get("architectures", [])


def hf_mamba_run_config(config: dict, tokenizer: str = TOKENIZER) -> DictConfig:
    """The platform's run config for an HF Mamba config.json: mixer blocks only, RMSNorm at the end."""
    c = {**DEFAULTS, **config}
    if c["hidden_act"] != "silu":
        raise CheckpointError(f"config.json: hidden_act '{c['hidden_act']}'; the platform's Mamba gates with silu")
    rank = c["time_step_rank"]
    model = ModelConfig(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                        mlp="none", norm_eps=c["layer_norm_epsilon"], final_norm="rmsnorm",
                        tie_embeddings=bool(c["tie_word_embeddings"]))
    mixer = dict(d_state=c["state_size"], d_conv=c["conv_kernel"], expand=c["expand"],
                 dt_rank=None if rank == "auto" else int(rank), bias=bool(c["use_bias"]), conv_bias=bool(c["use_conv_bias"]))
    return run_config(model, mixer, None, tokenizer)


def map_hf_mamba_state(state: dict[str, torch.Tensor], model: LM, source: str) -> dict[str, torch.Tensor]:
    """The HF state dict under the platform's names (see the module docstring), every tensor checked."""
    if "backbone.embedding.weight" in state and "backbone.embeddings.weight" not in state:
        state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in state.items()}
    m = StateMapper(state, model, source)
    m.copy("backbone.embeddings.weight", "embedding.weight")
    for i, block in enumerate(model.layers):
        m.copy(f"backbone.layers.{i}.norm.weight", f"layers.{i}.norm.weight")
        for name in block.mixer.state_dict():
            m.copy(f"backbone.layers.{i}.mixer.{name}", f"layers.{i}.mixer.{name}")
    m.copy("backbone.norm_f.weight", "norm_f.weight")
    if model.lm_head is None:
        m.drop("lm_head.weight")
    else:
        m.copy("lm_head.weight", "lm_head.weight")
    return m.finish()


def load_hf_mamba(folder: str | Path, config: dict | None = None) -> tuple[LM, dict]:
    """The HF Mamba model in `folder` as the platform's LM (fp32, CPU) and what describes it (kind,
    run_config, vocab_size, source). The tokenizer is the folder's tokenizer.json, else GPT-NeoX's hub id."""
    folder = Path(folder)
    config = config if config is not None else read_config(folder)
    cfg = hf_mamba_run_config(config, folder_tokenizer(folder, TOKENIZER))
    model = build_model(cfg)
    model.load_state_dict(map_hf_mamba_state(read_weights(folder), model, str(folder)))
    info = {"kind": KIND, "source": str(folder), "run_config": OmegaConf.to_container(cfg), "vocab_size": cfg.model.vocab_size}
    return model, info
