"""Causal multi-head attention with rotary embeddings and optional grouped-query heads.

Shapes: B batch, L new tokens, S cached + new tokens, H query heads, G key/value heads, K head dim.
"""
from __future__ import annotations

import functools
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
    """Keys and values of up to S tokens, and pos: the number of tokens already written, as a (1,) int64
    tensor on the cache's device, so that a decoding step reads and advances it without the host (and a
    CUDA graph that captured the step replays with the current position)."""

    k_BGSK: Tensor
    v_BGSK: Tensor
    pos: Tensor


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
        start = int(cache.pos) if cache is not None else 0  # one host read per prefill; `step` needs none
        pos_L = torch.arange(start, start + L, device=x_BLD.device)
        q, k, v = self._qkv(x_BLD, pos_L)
        if cache is None:
            mask = None
        else:
            if start + L > cache.k_BGSK.shape[2]:
                raise ValueError(f"attention cache holds {cache.k_BGSK.shape[2]} tokens; asked for {start + L}")
            cache.k_BGSK[:, :, start : start + L] = k
            cache.v_BGSK[:, :, start : start + L] = v
            cache.pos.fill_(start + L)
            if start == 0:  # an empty cache: plain causal attention over the new tokens (flash kernels)
                mask = None
            else:
                k, v = cache.k_BGSK[:, :, : start + L], cache.v_BGSK[:, :, : start + L]
                # new query i sits at absolute position start + i and may see keys 0..start + i
                mask = torch.arange(start + L, device=x_BLD.device)[None, :] <= pos_L[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.G != self.H
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, L, self.H * self.K))

    def step(self, x_BD: Tensor, cache: AttentionCache) -> Tensor:
        """One token at position cache.pos, computed with no host synchronisation (CUDA-graph capturable).

        The new key and value are written at the device-side position, and the query attends over the
        whole static cache with the slots not yet written masked out, so no shape depends on the position.
        Writing past the cache's end is an index error (on CUDA a device-side assert): the caller bounds it.
        """
        B = x_BD.shape[0]
        pos_1 = cache.pos
        q, k, v = self._qkv(x_BD[:, None], pos_1)
        cache.k_BGSK.index_copy_(2, pos_1, k)
        cache.v_BGSK.index_copy_(2, pos_1, v)
        S = cache.k_BGSK.shape[2]
        mask_1S = torch.arange(S, device=x_BD.device)[None, :] <= pos_1[:, None]
        cache.pos.add_(1)
        y = F.scaled_dot_product_attention(
            q, cache.k_BGSK, cache.v_BGSK, attn_mask=mask_1S, enable_gqa=self.G != self.H
        )
        return self.out_proj(y.reshape(B, self.H * self.K))

    def allocate_cache(self, batch_size, max_len, device=None, dtype=None) -> AttentionCache:
        shape = (batch_size, self.G, max_len, self.K)
        dtype = dtype or self.qkv_proj.weight.dtype
        device = device or self.qkv_proj.weight.device
        zeros = functools.partial(torch.zeros, shape, device=device, dtype=dtype)
        return AttentionCache(zeros(), zeros(), torch.zeros(1, dtype=torch.int64, device=device))
