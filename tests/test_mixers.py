"""The Mixer contract (blocks/mixer.py), checked for every registered mixer through the registry:
causality, recurrent step == parallel forward, prefill + step == forward, gradients, bf16."""
from __future__ import annotations

import pytest
import torch

from blocks import MIXERS, build_mixer

D = 16
# name -> (registered mixer, its config, dtype, tolerance of recurrent vs parallel). The Mamba scans keep
# their state in fp32 whatever the input, so they are compared in fp32; attention is exact in float64.
VARIANTS = {
    "mamba": ("mamba", dict(d_state=4, chunk_size=8), torch.float32, 1e-5),
    "mamba-no-conv-bias": ("mamba", dict(d_state=4, chunk_size=8, conv_bias=False), torch.float32, 1e-5),
    "mamba2": ("mamba2", dict(d_state=8, headdim=4, chunk_size=8), torch.float32, 1e-5),
    "mamba2-2groups": ("mamba2", dict(d_state=8, headdim=4, chunk_size=8, ngroups=2), torch.float32, 1e-5),
    "attention": ("attention", dict(n_heads=4), torch.float64, 1e-10),
    "attention-gqa": ("attention", dict(n_heads=4, n_kv_heads=2), torch.float64, 1e-10),
    "attention-mqa": ("attention", dict(n_heads=4, n_kv_heads=1), torch.float64, 1e-10),
}


def make(variant: str, seed: int = 0):
    name, cfg, dtype, tol = VARIANTS[variant]
    torch.manual_seed(seed)
    return build_mixer(name, D, cfg).to(dtype).eval(), dtype, tol


def test_every_registered_mixer_is_covered():
    assert {name for name, *_ in VARIANTS.values()} == set(MIXERS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    mixer, dtype, _ = make(variant)
    x = torch.randn(2, 21, D, dtype=dtype)
    s = 9
    x2 = x.clone()
    x2[:, s + 1 :] += torch.randn_like(x2[:, s + 1 :])
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y2[:, : s + 1], y[:, : s + 1], rtol=0, atol=0)
    assert not torch.allclose(y2[:, s + 1 :], y[:, s + 1 :])


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_matches_forward(variant):
    mixer, dtype, tol = make(variant)
    x = torch.randn(2, 19, D, dtype=dtype)
    with torch.no_grad():
        y = mixer(x)
        cache = mixer.allocate_cache(2, max_len=19)
        y_steps = torch.stack([mixer.step(x[:, t], cache) for t in range(19)], dim=1)
    torch.testing.assert_close(y_steps, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("split", [1, 2, 11])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_step_matches_forward(variant, split):
    mixer, dtype, tol = make(variant)
    x = torch.randn(2, 23, D, dtype=dtype)
    with torch.no_grad():
        y = mixer(x)
        cache = mixer.allocate_cache(2, max_len=23)
        y_parts = [mixer(x[:, :split], cache), mixer(x[:, split : split + 7], cache)]  # two prefills
        y_parts += [mixer.step(x[:, t], cache)[:, None] for t in range(split + 7, 23)]
    torch.testing.assert_close(torch.cat(y_parts, dim=1), y, rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_finite_gradient(variant):
    mixer, dtype, _ = make(variant)
    mixer.train()(torch.randn(2, 10, D, dtype=dtype)).square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_forward_and_step(variant):
    mixer, _, _ = make(variant)
    mixer = mixer.to(torch.bfloat16)
    x = torch.randn(2, 9, D, dtype=torch.bfloat16)
    with torch.no_grad():
        y = mixer(x)
        cache = mixer.allocate_cache(2, max_len=9)
        y_step = mixer.step(x[:, 0], cache)
    assert y.dtype == y_step.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y_step, y[:, 0], rtol=2e-2, atol=2e-2)
