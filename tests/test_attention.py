import pytest
import torch

from blocks.attention import Attention, AttentionConfig


def make(d=32, heads=4, kv=None):
    torch.manual_seed(0)
    return Attention(d, AttentionConfig(n_heads=heads, n_kv_heads=kv)).double()


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_causal(kv):
    attn = make(kv=kv)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    y = attn(x)
    s = 6
    x2 = x.clone()
    x2[:, s + 1 :] += torch.randn_like(x2[:, s + 1 :])
    y2 = attn(x2)
    torch.testing.assert_close(y[:, : s + 1], y2[:, : s + 1], rtol=0, atol=0)
    assert not torch.allclose(y[:, s + 1 :], y2[:, s + 1 :])


@pytest.mark.parametrize("kv", [None, 2])
def test_step_and_prefill_match_parallel(kv):
    attn = make(kv=kv)
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    y = attn(x)
    cache = attn.allocate_cache(3, 10)
    ys = [attn.step(x[:, t], cache) for t in range(10)]
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-10, atol=1e-10)
    cache = attn.allocate_cache(3, 10)
    head = attn(x[:, :7], cache)
    tail = [attn.step(x[:, t], cache) for t in range(7, 10)]
    torch.testing.assert_close(torch.cat([head, torch.stack(tail, 1)], 1), y, rtol=1e-10, atol=1e-10)


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
