"""Causal multi-head attention with rotary embeddings and optional grouped-query heads.

Shapes: B batch, L new tokens, S cached + new tokens, H query heads, G key/value heads, K head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.mixer import Mixer


@dataclass
class AttentionConfig:
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: as many as query heads (plain MHA); fewer: grouped-query
    rope_theta: float = 10000.0
    bias: bool = False


@dataclass
class AttentionCache:
    k_BGSK: Tensor
    v_BGSK: Tensor
    pos: int = 0  # number of tokens already in the cache


def rotary(x_BHLK: Tensor, pos_L: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (Su et al. 2021, eq. 34), rotating pairs (i, i + K/2)."""
    K = x_BHLK.shape[-1]
    inv_freq = theta ** (-torch.arange(0, K, 2, device=x_BHLK.device, dtype=torch.float32) / K)
    angle_LK2 = pos_L.float()[:, None] * inv_freq[None, :]
    cos, sin = angle_LK2.cos(), angle_LK2.sin()
    x1, x2 = x_BHLK.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BHLK.dtype)


class Attention(Mixer):
    """Causal softmax attention (Vaswani et al. 2017) through torch's fused SDPA kernels.

    Grouped-query attention (Ainslie et al. 2023) shares each key/value head among
    n_heads / n_kv_heads query heads, shrinking the KV cache by that factor.
    """

    def __init__(self, d_model: int, cfg: AttentionConfig):
        super().__init__()
        n_kv = cfg.n_kv_heads or cfg.n_heads
        if cfg.n_heads < 1 or d_model % cfg.n_heads:
            raise ValueError(f"attention: d_model={d_model} is not divisible by n_heads={cfg.n_heads}")
        if n_kv < 1 or cfg.n_heads % n_kv:
            raise ValueError(f"attention: n_heads={cfg.n_heads} is not divisible by n_kv_heads={n_kv}")
        self.H, self.G, self.K = cfg.n_heads, n_kv, d_model // cfg.n_heads
        if self.K % 2:
            raise ValueError(f"attention: head dim d_model/n_heads={self.K} must be even for rotary embeddings")
        self.theta = cfg.rope_theta
        self.qkv_proj = nn.Linear(d_model, (self.H + 2 * self.G) * self.K, bias=cfg.bias)
        self.out_proj = nn.Linear(self.H * self.K, d_model, bias=cfg.bias)

    def _qkv(self, x_BLD: Tensor, pos_L: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, _ = x_BLD.shape
        qkv = self.qkv_proj(x_BLD).view(B, L, self.H + 2 * self.G, self.K).transpose(1, 2)
        q, k, v = qkv.split([self.H, self.G, self.G], dim=1)
        return rotary(q, pos_L, self.theta), rotary(k, pos_L, self.theta), v

    def forward(self, x_BLD: Tensor, cache: AttentionCache | None = None) -> Tensor:
        B, L, _ = x_BLD.shape
        start = cache.pos if cache is not None else 0
        pos_L = torch.arange(start, start + L, device=x_BLD.device)
        q, k, v = self._qkv(x_BLD, pos_L)
        if cache is None:
            mask = None
        else:
            if start + L > cache.k_BGSK.shape[2]:
                raise ValueError(f"attention cache holds {cache.k_BGSK.shape[2]} tokens; asked for {start + L}")
            cache.k_BGSK[:, :, start : start + L] = k
            cache.v_BGSK[:, :, start : start + L] = v
            cache.pos = start + L
            k, v = cache.k_BGSK[:, :, : start + L], cache.v_BGSK[:, :, : start + L]
            # new query i sits at absolute position start + i and may see keys 0..start + i
            mask = torch.arange(start + L, device=x_BLD.device)[None, :] <= pos_L[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.G != self.H
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, L, self.H * self.K))

    def step(self, x_BD: Tensor, cache: AttentionCache) -> Tensor:
        return self.forward(x_BD[:, None], cache)[:, 0]

    def allocate_cache(self, batch_size, max_len, device=None, dtype=None) -> AttentionCache:
        shape = (batch_size, self.G, max_len, self.K)
        dtype = dtype or self.qkv_proj.weight.dtype
        device = device or self.qkv_proj.weight.device
        return AttentionCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
