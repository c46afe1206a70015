"""Zyphra's released BlackMamba checkpoints (github.com/Zyphra/BlackMamba; hub ids Zyphra/BlackMamba-1.5B, -2.8B).

A release is config.json (num_layers, hidden_size, state_size, conv_dimension, expansion_factor, vocab_size,
ffn_hidden_size, mamba_moe_layers, add_bias_linear, swiglu, ...) and pytorch_model.bin holding
{"model": state_dict}. mamba_moe_layers has one entry per block, read as the released code reads it:
"r" is a Mamba block; otherwise a first character "1" is a dense MLP block and any other entry an MoE block
whose expert count is its last character ("8"). Entries "r<n>" (a Mamba block with a parallel MLP or MoE)
have no counterpart in the platform and are refused.

Keys (i the block index, e the expert; D model width, F ffn_hidden_size, E experts, V vocabulary):
    embedding.word_embeddings.weight                          (V, D)   -> embedding.weight
    decoder.layers.i.norm.weight                              (D,)     -> layers.i.norm.weight (RMSNorm)
    decoder.layers.i.mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,out_proj}.* -> layers.i.mixer.* (same names)
    decoder.layers.i.mixer.router.{weight,bias}               (E, D), (E,) -> layers.i.mlp.gate.*
    decoder.layers.i.mixer.local_experts.e.linear_fc1.weight  (2F, D)  -> layers.i.mlp.w_in[e] = its transpose
    decoder.layers.i.mixer.local_experts.e.linear_fc2.weight  (D, F)   -> layers.i.mlp.w_out[e] = its transpose
    decoder.layers.i.mixer.linear_fc{1,2}.weight              dense MLP block -> layers.i.mlp.fc{1,2}.weight
    decoder.final_layernorm.{weight,bias}                     (D,)     -> norm_f.* (LayerNorm)
fc1's first F rows are the gate and the last F the value, the order the platform's GLU uses. An
output_layer.weight, if the file has one, is ignored: the released loader overwrites it with the embedding.

The loaded model computes what the released code computes: pre-norm residual blocks (RMSNorm, eps 1e-5,
fp32 residual), dt_rank = ceil(D / 16), a final LayerNorm, the tied head, and top-1 routing to the expert
with the largest sigmoid(router logit), whose output is scaled by that sigmoid: the platform's Sinkhorn
router does exactly this in eval mode. (The released code builds its model from the fields above only;
other config.json fields, such as layernorm_epsilon, are not read by it and not here.)

Activation: the config says `swiglu: true`, but the released code only uses that flag to double fc1 (a
gated unit) and keeps its default activation, torch.nn.functional.gelu, so its experts compute
gelu(x W_gate) * (x W_up): GeGLU with the exact (erf) GELU. The loader therefore defaults to
activation="geglu"; activation="swiglu" follows the config's label instead (and gives other outputs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from blocks.model import LM, MixerBlock, ModelConfig
from blocks.moe import MoE
from experiments.build import build_model
from experiments.checkpoint import CheckpointError
from experiments.weights import StateMapper, folder_tokenizer, read_config, read_weights, run_config

KIND = "zyphra-blackmamba"
TOKENIZER = "EleutherAI/gpt-neox-20b"  # no tokenizer ships with the release; it was trained with GPT-NeoX's
REQUIRED = ("num_layers", "hidden_size", "state_size", "conv_dimension", "expansion_factor", "vocab_size",
            "ffn_hidden_size", "mamba_moe_layers")
NORM_EPS = 1e-5  # the released code's layernorm_epsilon default, for RMSNorm and the final LayerNorm


def is_blackmamba(config: dict) -> bool:
    return "mamba_moe_layers" in config and "hidden_size" in config and "num_layers" in config


def layer_kinds(config: dict) -> tuple[list[str], int | None]:
    """(block kinds 'mamba' / 'moe' / 'mlp' per layer, the expert count or None) from mamba_moe_layers."""
    spec = config["mamba_moe_layers"]
    spec = spec.replace(",", " ").split() if isinstance(spec, str) else [str(s) for s in spec]
    n = config["num_layers"]
    if not spec:
        return ["mamba"] * n, None
    if len(spec) != n:
        raise CheckpointError(f"config.json: mamba_moe_layers has {len(spec)} entries for num_layers={n}")
    kinds, experts = [], set()
    for i, s in enumerate(spec):
        if s == "r":
            kinds.append("mamba")
        elif not s.isdigit():
            raise CheckpointError(f"config.json: mamba_moe_layers[{i}] = '{s}' (a Mamba block with a parallel MLP "
                                  "or MoE, or unknown) has no counterpart in the platform's models")
        elif s[0] == "1":
            kinds.append("mlp")
        else:
            kinds.append("moe")
            experts.add(int(s[-1]))
    if len(experts) > 1:
        raise CheckpointError(f"config.json: mamba_moe_layers has MoE layers with different expert counts "
                              f"{sorted(experts)}; the platform's models have one expert count")
    return kinds, (experts.pop() if experts else None)


def blackmamba_run_config(config: dict, tokenizer: str = TOKENIZER, activation: str = "geglu") -> DictConfig:
    """The platform's run config for a released config.json (see the module docstring)."""
    absent = [key for key in REQUIRED if key not in config]
    if absent:
        raise CheckpointError(f"config.json lacks {', '.join(absent)} (a released BlackMamba config has them)")
    if not config.get("swiglu", True):
        raise CheckpointError("config.json: swiglu is false (plain GELU MLPs), which the platform's blocks do not have")
    expand = config["expansion_factor"]
    if expand != int(expand):
        raise CheckpointError(f"config.json: expansion_factor must be an integer, got {expand}")
    kinds, experts = layer_kinds(config)
    model = ModelConfig(vocab_size=config["vocab_size"], d_model=config["hidden_size"], n_layers=len(kinds),
                        ffn_dim=config["ffn_hidden_size"], pattern=kinds, mlp_activation=activation,
                        norm_eps=NORM_EPS, final_norm="layernorm", tie_embeddings=True)
    bias = bool(config.get("add_bias_linear", False))
    mixer = dict(d_state=config["state_size"], d_conv=config["conv_dimension"], expand=int(expand), dt_rank=None,
                 bias=bias, conv_bias=True)
    moe = dict(num_experts=experts, top_k=1, activation=activation, capacity_factor=None, shared_ffn_dim=0,
               ffn_dim=None) if experts else None
    return run_config(model, mixer, moe, tokenizer)


def map_blackmamba_state(state: dict[str, torch.Tensor], model: LM, source: str) -> dict[str, torch.Tensor]:
    """The released state dict under the platform's names (see the module docstring), every tensor checked."""
    m = StateMapper(state, model, source)
    m.copy("embedding.word_embeddings.weight", "embedding.weight")
    m.drop("output_layer.weight")
    for i, block in enumerate(model.layers):
        src, dst = f"decoder.layers.{i}.", f"layers.{i}."
        m.copy(src + "norm.weight", dst + "norm.weight")
        if isinstance(block, MixerBlock):
            for name in block.mixer.state_dict():
                m.copy(f"{src}mixer.{name}", f"{dst}mixer.{name}")
        elif isinstance(block.mlp, MoE):
            E, D, F = block.mlp.num_experts, block.mlp.w_in.shape[1], block.mlp.ffn_dim
            m.copy(src + "mixer.router.weight", dst + "mlp.gate.weight")
            m.copy(src + "mixer.router.bias", dst + "mlp.gate.bias")
            experts = f"{src}mixer.local_experts."
            fc1 = [m.take(f"{experts}{e}.linear_fc1.weight", (2 * F, D)) for e in range(E)]
            fc2 = [m.take(f"{experts}{e}.linear_fc2.weight", (D, F)) for e in range(E)]
            if all(w is not None for w in fc1 + fc2):
                m.put(dst + "mlp.w_in", torch.stack([w.T for w in fc1]))  # (E, D, 2F), gate then value
                m.put(dst + "mlp.w_out", torch.stack([w.T for w in fc2]))  # (E, F, D)
        else:
            m.copy(src + "mixer.linear_fc1.weight", dst + "mlp.fc1.weight")
            m.copy(src + "mixer.linear_fc2.weight", dst + "mlp.fc2.weight")
    m.copy("decoder.final_layernorm.weight", "norm_f.weight")
    m.copy("decoder.final_layernorm.bias", "norm_f.bias")
    return m.finish()


def load_blackmamba(folder: str | Path, config: dict | None = None, activation: str = "geglu") -> tuple[LM, dict]:
    """The released model in `folder` as the platform's LM (fp32, CPU) and what describes it (kind,
    run_config, vocab_size, source). The tokenizer is the folder's tokenizer.json, else GPT-NeoX's hub id."""
    folder = Path(folder)
    config = config if config is not None else read_config(folder)
    cfg = blackmamba_run_config(config, folder_tokenizer(folder, TOKENIZER), activation)
    model = build_model(cfg)
    model.load_state_dict(map_blackmamba_state(read_weights(folder), model, str(folder)))
    info = {"kind": KIND, "source": str(folder), "run_config": OmegaConf.to_container(cfg), "vocab_size": cfg.model.vocab_size}
    return model, info
