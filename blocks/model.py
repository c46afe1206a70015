"""The language model: embedding, a pattern of pre-norm residual blocks, final norm, tied head.

BlackMamba (Anthony et al. 2024) alternates Mamba mixer blocks with MoE MLP blocks and counts
each as one layer: 30 layers = 15 Mamba + 15 MoE for the 1.5B model. Shapes: B batch, L length,
D model width, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks import MIXERS, build_mixer
from blocks.kernels import use_triton
from blocks.mlp import MLP
from blocks.moe import MoE, MoEConfig
from blocks.moe_decode import moe_step
from blocks.registry import lookup
from routers import Router

MLP_KINDS = ("mlp", "moe")


def next_token_loss(logits_BLV: Tensor, y_BL: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the logits against the next tokens, in fp32 (mean over tokens, or "sum"). On CUDA a
    kernel reads the bf16 logits as they are (blocks.kernels.cross_entropy); elsewhere, and inside
    pytorch_reference(), F.cross_entropy on an fp32 copy, the kernel's twin."""
    x_NV, y_N = logits_BLV.flatten(0, 1), y_BL.flatten()
    if use_triton(x_NV, kernel="cross_entropy") and x_NV.dtype != torch.float64:
        from blocks.kernels.cross_entropy import cross_entropy_triton  # imports Triton: Linux only

        return cross_entropy_triton(x_NV, y_N, reduction=reduction)
    return F.cross_entropy(x_NV.float(), y_N, reduction=reduction)


@dataclass
class ModelConfig:
    vocab_size: int | None = 256  # None in a run config: taken from the data
    d_model: int = 256
    n_layers: int = 8  # residual blocks, mixer and MLP blocks counted separately (as BlackMamba does)
    ffn_dim: int = 1024  # dense MLP width, and the default expert width
    mlp: str = "moe"  # "moe", "mlp" or "none" (a mixer-only stack, like the original Mamba LM)
    moe_every: int = 1  # every m-th MLP block is an MoE, the others dense MLPs
    attn_every: int = 0  # every k-th mixer block is attention (a Jamba-like hybrid); 0 = never
    pattern: list[str] | None = None  # an explicit block list (mixer names, "mlp", "moe"); overrides the above
    mlp_activation: str = "swiglu"  # dense MLP activation: "swiglu" or "geglu"
    norm_eps: float = 1e-5
    final_norm: str = "layernorm"  # the released BlackMamba ends with a LayerNorm with bias
    tie_embeddings: bool = True
    init_std: float = 0.02


def layer_pattern(cfg: ModelConfig, mixer: str) -> list[str]:
    """The list of block kinds, e.g. ['mamba', 'moe', 'mamba', 'moe'] for a 4-layer BlackMamba."""
    if cfg.pattern is not None:
        pattern = list(cfg.pattern)
        for kind in pattern:
            if kind not in MLP_KINDS:
                lookup(MIXERS, kind, "block kind in model.pattern (or 'mlp'/'moe')")
        return pattern
    if cfg.n_layers < 1:
        raise ValueError(f"model.n_layers must be >= 1, got {cfg.n_layers}")
    if cfg.mlp not in (*MLP_KINDS, "none"):
        raise ValueError(f"model.mlp must be one of moe, mlp, none; got '{cfg.mlp}'")
    if cfg.moe_every < 1 or cfg.attn_every < 0:
        raise ValueError("model.moe_every must be >= 1 and model.attn_every >= 0")
    if cfg.mlp == "none":
        n_mixers = cfg.n_layers
    elif cfg.n_layers % 2:
        raise ValueError(f"model.n_layers={cfg.n_layers} must be even: mixer and MLP blocks alternate")
    else:
        n_mixers = cfg.n_layers // 2
    pattern = []
    for i in range(n_mixers):
        hybrid_attn = cfg.attn_every and (i + 1) % cfg.attn_every == 0
        pattern.append("attention" if hybrid_attn else mixer)
        if cfg.mlp != "none":
            is_moe = cfg.mlp == "moe" and (i + 1) % cfg.moe_every == 0
            pattern.append("moe" if is_moe else "mlp")
    return pattern


class MixerBlock(nn.Module):
    """residual + mixer(RMSNorm(residual)), with the residual stream kept in fp32."""

    def __init__(self, d_model: int, mixer: nn.Module, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.mixer = mixer

    def forward(self, residual: Tensor, cache=None) -> tuple[Tensor, dict]:
        out, aux = self.branch(self.norm(residual.to(self.norm.weight.dtype)), cache)
        return residual + out.float(), aux

    def branch(self, h: Tensor, cache=None) -> tuple[Tensor, dict]:
        """What the block adds to the residual stream, from its normed input h (LM.forward's fused path)."""
        return self.mixer(h, cache), {}

    def step(self, residual_BD: Tensor, cache) -> Tensor:
        h = self.norm(residual_BD.to(self.norm.weight.dtype))
        return residual_BD + self.mixer.step(h, cache).float()


class MLPBlock(nn.Module):
    """residual + mlp(RMSNorm(residual)); an MoE also returns its auxiliary losses."""

    def __init__(self, d_model: int, mlp: nn.Module, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.mlp = mlp

    def forward(self, residual: Tensor, cache=None) -> tuple[Tensor, dict]:
        out, aux = self.branch(self.norm(residual.to(self.norm.weight.dtype)))
        return residual + out.float(), aux

    def branch(self, h: Tensor, cache=None) -> tuple[Tensor, dict]:
        """What the block adds to the residual stream, and an MoE's aux losses, from its normed input h."""
        out = self.mlp(h)
        return out if isinstance(out, tuple) else (out, {})

    def step(self, residual_BD: Tensor) -> Tensor:
        """One decoding step; an MoE takes its sync-free decode path (blocks.moe_decode)."""
        h = self.norm(residual_BD.to(self.norm.weight.dtype))
        out = moe_step(self.mlp, h) if isinstance(self.mlp, MoE) else self.mlp(h)
        return residual_BD + out.float()


class LM(nn.Module):
    """A causal language model over a pattern of mixer and MLP/MoE blocks."""

    def __init__(
        self,
        cfg: ModelConfig,
        mixer: str = "mamba",
        mixer_cfg=None,
        moe_cfg: MoEConfig | None = None,
        attention_cfg=None,
    ):
        super().__init__()
        self.cfg = cfg
        self.pattern = layer_pattern(cfg, mixer)
        moe_cfg = moe_cfg or MoEConfig()
        D = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, D)
        blocks = []
        for kind in self.pattern:
            if kind == "moe":
                blocks.append(MLPBlock(D, MoE(D, moe_cfg, cfg.ffn_dim), cfg.norm_eps))
            elif kind == "mlp":
                blocks.append(MLPBlock(D, MLP(D, cfg.ffn_dim, cfg.mlp_activation), cfg.norm_eps))
            else:  # a sequence mixer: the main one takes its config, hybrid attention blocks theirs
                kind_cfg = mixer_cfg if kind == mixer else attention_cfg if kind == "attention" else None
                blocks.append(MixerBlock(D, build_mixer(kind, D, kind_cfg), cfg.norm_eps))
        self.layers = nn.ModuleList(blocks)
        if cfg.final_norm == "layernorm":
            self.norm_f = nn.LayerNorm(D, eps=cfg.norm_eps)
        elif cfg.final_norm == "rmsnorm":
            self.norm_f = nn.RMSNorm(D, eps=cfg.norm_eps)
        else:
            raise ValueError(f"model.final_norm must be 'layernorm' or 'rmsnorm', got '{cfg.final_norm}'")
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, std) weights, residual-branch outputs scaled by 1/sqrt(n_layers).

        Parameters that a mixer initialises in its own way (dt bias, A_log, D, convolutions) are left alone.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(len(self.layers))
        nn.init.normal_(self.embedding.weight, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("out_proj", "fc2"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=out_std)

    def head(self, h_BLD: Tensor) -> Tensor:
        h = self.norm_f(h_BLD.to(self.norm_f.weight.dtype))
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def forward(self, idx_BL: Tensor, cache: list | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits (B, L, V) and the auxiliary losses summed over MoE layers.

        With a cache (from allocate_cache) the tokens continue the cached sequences (prefill). On CUDA each
        block's output is added to the residual stream inside the next block's RMSNorm kernel
        (blocks.kernels.add_norm); elsewhere, and inside pytorch_reference(), each block runs its own forward.
        """
        residual = self.embedding(idx_BL).float()
        aux_total: dict[str, Tensor] = {}
        fused = use_triton(residual, kernel="add_norm") and self.embedding.weight.dtype != torch.float64
        if fused:  # add each block's output and form the next block's norm in one kernel (blocks.kernels.add_norm)
            from blocks.kernels.add_norm import add_rms_norm_triton, rms_eps  # imports Triton: Linux only

            # h in the dtype the blocks' projections compute in (autocast's, else the weights'): no cast there
            dev = residual.device.type
            autocast_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        out = None  # on the fused path: the last block's output, not yet added to the residual stream
        for i, block in enumerate(self.layers):
            c = None if cache is None else cache[i]
            if fused:
                w = block.norm.weight
                residual, h = add_rms_norm_triton(residual, out, w, rms_eps(block.norm), autocast_dtype or w.dtype)
                out, aux = block.branch(h, c)
            else:
                residual, aux = block(residual, c)
            for k, v in aux.items():
                aux_total[k] = aux_total[k] + v if k in aux_total else v
        if out is not None:
            residual = residual + out  # fp32 + the block's dtype: one kernel
        return self.head(residual), aux_total

    def end_step(self) -> None:
        """End of an optimizer step in training: every router updates the state it carries between steps
        (`Router.end_step`: the aux-loss-free bias, the global batch's expert load). Call it once per optimizer
        step, after the step's forward passes (the training module does)."""
        for module in self.modules():
            if isinstance(module, Router):
                module.end_step()

    @torch.no_grad()
    def step(self, idx_B: Tensor, cache: list) -> Tensor:
        """One decoding step: logits (B, V) for the next token, advancing every mixer's state.

        Free of host synchronisation for the built-in mixers and MoE (no .item(), no data-dependent
        shapes), so experiments.cuda_graphs can capture it whole in a CUDA graph. On CUDA the Mamba and
        MoE blocks run fused decoding kernels (blocks.fused_step); the modules' steps are their reference."""
        if use_triton(idx_B) and self.embedding.weight.dtype != torch.float64:  # the kernels compute in fp32
            from blocks.fused_step import fused_step  # imports Triton, which only Linux installs

            return fused_step(self, idx_B, cache)
        residual = self.embedding(idx_B).float()
        for block, c in zip(self.layers, cache):
            residual = block.step(residual, c) if isinstance(block, MixerBlock) else block.step(residual)
        return self.head(residual)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """Per-block recurrent state (None for MLP/MoE blocks, which keep none)."""
        return [
            block.mixer.allocate_cache(batch_size, max_len, device=device, dtype=dtype)
            if isinstance(block, MixerBlock)
            else None
            for block in self.layers
        ]
