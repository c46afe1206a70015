"""The Mamba-1 selective scan (chunked vs sequential reference) and the Mamba mixer contract, on tiny CPU shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.mamba import Mamba, MambaCache, MambaConfig
from blocks.scan import selective_scan_chunked, selective_scan_ref, selective_state_step


def scan_inputs(batch=2, d_inner=3, d_state=4, length=13, dtype=torch.float32, seed=0):
    """u, delta, A, B, C, D, z, delta_bias, initial_state in mamba-ssm's shapes; delta > 0 and A < 0."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d_inner, length, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, d_inner, length, generator=g, dtype=dtype) - 1)
    A = -torch.empty(d_inner, d_state, dtype=dtype).uniform_(0.5, 4, generator=g)
    B = torch.randn(batch, d_state, length, generator=g, dtype=dtype)
    C = torch.randn(batch, d_state, length, generator=g, dtype=dtype)
    D = torch.randn(d_inner, generator=g, dtype=dtype)
    z = torch.randn(batch, d_inner, length, generator=g, dtype=dtype)
    delta_bias = torch.randn(d_inner, generator=g, dtype=dtype) - 1
    state = torch.randn(batch, d_inner, d_state, generator=g, dtype=dtype)
    return u, delta, A, B, C, D, z, delta_bias, state


def extras(D, z, delta_bias, state):
    return dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True, initial_state=state)


@pytest.mark.parametrize("length", [1, 5, 16, 29])
@pytest.mark.parametrize("with_extras", [False, True])
def test_chunked_matches_ref(length, with_extras):
    u, delta, A, B, C, *rest = scan_inputs(length=length, seed=length)
    kw = extras(*rest) if with_extras else {}
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, return_last_state=True, **kw)
    y, last = selective_scan_chunked(u, delta, A, B, C, return_last_state=True, chunk_size=8, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)
    assert y.shape == u.shape and last.shape == (2, 3, 4) and last.dtype == torch.float32
    y_only = selective_scan_chunked(u, delta, A, B, C, chunk_size=8, **kw)
    torch.testing.assert_close(y_only, y, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 40), log2_chunk=st.integers(0, 5), d_state=st.integers(1, 5),
    with_extras=st.booleans(), seed=st.integers(0, 2**16),
)
def test_chunked_matches_ref_any_shape(length, log2_chunk, d_state, with_extras, seed):
    u, delta, A, B, C, *rest = scan_inputs(d_state=d_state, length=length, seed=seed)
    kw = extras(*rest) if with_extras else {}
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, return_last_state=True, **kw)
    y, last = selective_scan_chunked(u, delta, A, B, C, return_last_state=True, chunk_size=2**log2_chunk, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)


def test_chunked_grads_match_ref():
    inputs = scan_inputs(length=11, dtype=torch.float64)
    grads = []
    for fn, kw in ((selective_scan_ref, {}), (selective_scan_chunked, dict(chunk_size=4))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        u, delta, A, B, C, *rest = leaves
        y, last = fn(u, delta, A, B, C, return_last_state=True, **extras(*rest), **kw)
        (y.sin().sum() + last.cos().sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("with_extras", [False, True])
def test_chunked_gradcheck(with_extras):
    # 6 tokens in chunks of 4: two chunks, the second padded
    inputs = scan_inputs(batch=1, d_inner=2, d_state=2, length=6, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (inputs if with_extras else inputs[:5])]

    def fn(u, delta, A, B, C, *rest):
        kw = extras(*rest) if with_extras else {}
        return selective_scan_chunked(u, delta, A, B, C, return_last_state=True, chunk_size=4, **kw)

    assert torch.autograd.gradcheck(fn, inputs)


def test_chunked_strong_decay_is_finite():
    # sum of delta*A reaches about -1e4 within a chunk: an exp(-cumsum) factorisation would overflow
    u, delta, A, B, C, *_ = scan_inputs(length=40, seed=3)
    delta = delta * 50 + 5
    A = A * 4
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C)]
    y, last = selective_scan_chunked(*leaves, return_last_state=True, chunk_size=32)
    (y.sum() + last.sum()).backward()
    assert all(torch.isfinite(t).all() for t in (y, last, *(t.grad for t in leaves)))
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)


def test_chunked_bad_chunk_size_raises():
    u, delta, A, B, C, *_ = scan_inputs()
    with pytest.raises(ValueError, match="power of two"):
        selective_scan_chunked(u, delta, A, B, C, chunk_size=12)


def test_state_step_matches_ref():
    u, delta, A, B, C, D, z, delta_bias, state = scan_inputs(length=6)
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, return_last_state=True, **extras(D, z, delta_bias, state))
    ys = [
        selective_state_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], delta_bias, True)
        for t in range(u.shape[-1])
    ]
    torch.testing.assert_close(torch.stack(ys, dim=-1), y_ref)
    torch.testing.assert_close(state, last_ref)


def tiny_mamba(seed=0, **kw) -> Mamba:
    torch.manual_seed(seed)
    return Mamba(16, MambaConfig(d_state=4, chunk_size=8, **kw)).eval()  # d_inner 32, dt_rank 1


def test_parameter_marks_and_cache_layout():
    mixer = tiny_mamba()
    no_decay = {n for n, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"A_log", "D"}
    assert getattr(mixer.dt_proj.bias, "_no_reinit", False)
    cache = mixer.allocate_cache(2, max_len=23)
    assert isinstance(cache, MambaCache) and cache.ssm_state.dtype == torch.float32
    assert cache.conv_state.shape == (2, 32, 4) and cache.ssm_state.shape == (2, 32, 4)
    assert mixer.to(torch.bfloat16).allocate_cache(2, 9).ssm_state.dtype == torch.float32


def test_init():
    cfg = MambaConfig()
    mixer = Mamba(64, cfg)
    dt = F.softplus(mixer.dt_proj.bias)
    assert ((dt >= cfg.dt_min * (1 - 1e-5)) & (dt <= cfg.dt_max * (1 + 1e-5))).all()
    A = -torch.exp(mixer.A_log)
    torch.testing.assert_close(A, -torch.arange(1.0, 17.0).expand(128, 16))  # S4D-real
    assert mixer.dt_rank == 4 and mixer.dt_proj.weight.abs().max() <= 4**-0.5
    assert (mixer.D == 1).all()


@pytest.mark.parametrize("d_model, expected", [(1152, 8_421_120), (1472, 13_704_320)])
def test_parameter_count(d_model, expected):
    with torch.device("meta"):
        mixer = Mamba(d_model, MambaConfig())
    assert sum(p.numel() for p in mixer.parameters()) == expected


@pytest.mark.parametrize(
    "d_model, kw, match",
    [
        (16, dict(backend="cuda"), r"unknown backend 'cuda'. Valid choices: auto, torch, triton, mamba_ssm"),
        (0, {}, "d_model must be >= 1"),
        (16, dict(d_state=0), "d_state must be a positive integer"),
        (16, dict(d_conv=-1), "d_conv must be a positive integer"),
        (16, dict(expand=1.5), "expand must be a positive integer"),
        (16, dict(dt_rank=0), "dt_rank must be a positive integer"),
        (16, dict(chunk_size=12), "chunk_size must be a power of two"),
        (16, dict(dt_min=0.2), "dt_min"),
        (16, dict(dt_init_floor=0.0), "dt_init_floor"),
        (16, dict(dt_scale=-1.0), "dt_scale"),
    ],
)
def test_bad_config_raises(d_model, kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba(d_model, MambaConfig(**kw))
