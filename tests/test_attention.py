import pytest
import torch

from blocks.attention import Attention, AttentionConfig


def make(d=32, heads=4, kv=None):
    torch.manual_seed(0)
    return Attention(d, AttentionConfig(n_heads=heads, n_kv_heads=kv)).double()


def test_gqa_shrinks_cache_and_params():
    full, gqa = make(kv=None), make(kv=1)
    assert gqa.allocate_cache(1, 8).k_BGSK.shape[1] == 1
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in full.parameters())


def test_bad_heads():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        Attention(30, AttentionConfig(n_heads=4))
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(32, AttentionConfig(n_heads=4, n_kv_heads=3))


def test_cache_overflow_is_reported():
    attn = make()
    cache = attn.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4"):
        attn(torch.randn(1, 5, 32, dtype=torch.float64), cache)
