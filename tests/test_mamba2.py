"""The SSD scan (chunked vs sequential reference) and the Mamba-2 mixer contract, on tiny CPU shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.mamba2 import Mamba2, Mamba2Cache, Mamba2Config
from blocks.ssd import ssd_chunked, ssd_ref, ssd_step


def ssd_inputs(batch=2, length=13, nheads=4, headdim=3, ngroups=1, dstate=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, nheads, headdim, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, nheads, generator=g, dtype=dtype) - 1)
    A = -torch.empty(nheads, dtype=dtype).uniform_(0.5, 4, generator=g)
    B = torch.randn(batch, length, ngroups, dstate, generator=g, dtype=dtype)
    C = torch.randn(batch, length, ngroups, dstate, generator=g, dtype=dtype)
    D = torch.randn(nheads, generator=g, dtype=dtype)
    state = torch.randn(batch, nheads, headdim, dstate, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("length", [1, 5, 16, 29])
@pytest.mark.parametrize("with_extras", [False, True])
def test_chunked_matches_ref(ngroups, length, with_extras):
    x, dt, A, B, C, D, state = ssd_inputs(length=length, ngroups=ngroups, seed=length)
    kw = dict(D=D, initial_state=state) if with_extras else {}
    y_ref, last_ref = ssd_ref(x, dt, A, B, C, return_last_state=True, **kw)
    y, last = ssd_chunked(x, dt, A, B, C, return_last_state=True, chunk_size=8, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)
    assert last.dtype == torch.float32 and last.shape == state.shape


@settings(max_examples=25, deadline=None)
@given(
    ngroups=st.sampled_from([1, 2]), reps=st.integers(1, 3), length=st.integers(1, 40),
    chunk_size=st.integers(1, 24), seed=st.integers(0, 2**16),
)
def test_chunked_matches_ref_any_shape(ngroups, reps, length, chunk_size, seed):
    x, dt, A, B, C, D, state = ssd_inputs(length=length, nheads=ngroups * reps, ngroups=ngroups, seed=seed)
    y_ref, last_ref = ssd_ref(x, dt, A, B, C, D, state, True)
    y, last = ssd_chunked(x, dt, A, B, C, D, state, True, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)


def test_chunked_grads_match_ref():
    inputs = ssd_inputs(length=11, ngroups=2, dtype=torch.float64)
    grads = []
    for fn, kw in ((ssd_ref, {}), (ssd_chunked, dict(chunk_size=4))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, dt, A, B, C, D, state = leaves
        y, last = fn(x, dt, A, B, C, D, state, True, **kw)
        (y.sin().sum() + last.cos().sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref)


def test_chunked_gradcheck():
    # 6 tokens in chunks of 4: two chunks, one padded; two groups of one head each
    inputs = [t.requires_grad_() for t in ssd_inputs(batch=1, length=6, nheads=2, headdim=2, ngroups=2,
                                                       dstate=2, dtype=torch.float64)]

    def fn(x, dt, A, B, C, D, state):
        return ssd_chunked(x, dt, A, B, C, D, state, return_last_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs)


def test_chunked_strong_decay_is_finite():
    # sum of dt*A reaches about -1e4 within a chunk: a naive exp(cumsum) ratio would overflow
    x, dt, A, B, C, D, state = ssd_inputs(length=40, seed=3)
    dt = dt * 50 + 5
    A = A * 4
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, last = ssd_chunked(*leaves, D, state, True, chunk_size=32)
    y.sum().backward()
    assert all(torch.isfinite(t).all() for t in (y, last, *(t.grad for t in leaves)))
    y_ref, last_ref = ssd_ref(x, dt, A, B, C, D, state, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)


def test_ssd_step_matches_ref():
    x, dt, A, B, C, D, state = ssd_inputs(length=6, ngroups=2)
    y_ref, last_ref = ssd_ref(x, dt, A, B, C, D, state, True)
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(x.shape[1])]
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref)
    torch.testing.assert_close(state, last_ref)


def tiny_mamba2(ngroups=1, chunk_size=8, seed=0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_state=8, headdim=4, ngroups=ngroups, chunk_size=chunk_size, **kw)
    return Mamba2(16, cfg).eval()  # d_inner 32, 8 heads


def test_parameter_marks_and_cache_layout():
    mixer = tiny_mamba2(ngroups=2)
    no_decay = {n for n, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"A_log", "D", "dt_bias"}
    cache = mixer.allocate_cache(2, max_len=23)
    assert isinstance(cache, Mamba2Cache) and cache.ssm_state.dtype == torch.float32
    assert mixer.to(torch.bfloat16).allocate_cache(2, 9).ssm_state.dtype == torch.float32


def test_init_ranges():
    cfg = Mamba2Config()
    mixer = Mamba2(256, cfg)  # 16 heads
    dt = F.softplus(mixer.dt_bias)
    A = torch.exp(mixer.A_log)
    assert ((dt >= cfg.dt_min * (1 - 1e-5)) & (dt <= cfg.dt_max * (1 + 1e-5))).all()
    assert ((A >= cfg.A_init_range[0]) & (A <= cfg.A_init_range[1])).all()


@pytest.mark.parametrize("d_model, kw", [(16, {}), (24, dict(ngroups=2, bias=True, conv_bias=False))])
def test_parameter_count(d_model, kw):
    cfg = Mamba2Config(d_state=8, headdim=4, **kw)
    E = cfg.expand * d_model
    H, GN, X = E // cfg.headdim, cfg.ngroups * cfg.d_state, E + 2 * cfg.ngroups * cfg.d_state
    expected = (
        d_model * (2 * E + 2 * GN + H) + E * d_model  # in_proj, out_proj
        + X * (cfg.d_conv + cfg.conv_bias)  # depthwise conv
        + 3 * H + E  # dt_bias, A_log, D, norm weight
        + cfg.bias * (2 * E + 2 * GN + H + d_model)
    )
    assert sum(p.numel() for p in Mamba2(d_model, cfg).parameters()) == expected


@pytest.mark.parametrize(
    "d_model, kw, match",
    [
        (16, dict(headdim=5), "not divisible by headdim"),
        (16, dict(headdim=4, ngroups=3), "not divisible by ngroups"),
        (0, {}, "d_model must be >= 1"),
        (16, dict(d_state=0), "d_state must be >= 1"),
        (16, dict(chunk_size=0), "chunk_size must be >= 1"),
        (16, dict(headdim=4, A_init_range=(0, 16)), "A_init_range"),
        (16, dict(headdim=4, dt_min=0.2), "dt_min"),
    ],
)
def test_bad_config_raises(d_model, kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(d_model, Mamba2Config(**kw))
