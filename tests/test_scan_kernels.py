"""Triton kernels of the Mamba-1 mixer (selective scan, causal conv, decoding steps) against their PyTorch twins, on the CPU
through Triton's interpreter: fp32, tiny shapes, lengths that are not a multiple of the chunk, channel and
state counts that are not a multiple of the block, forward and every gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blocks.conv import causal_conv1d, causal_conv1d_step
from blocks.kernels import force_triton
from blocks.kernels.causal_conv1d import causal_conv1d_step_triton, causal_conv1d_triton
from blocks.kernels.selective_scan import ScanTiles, selective_scan_triton
from blocks.kernels.ssm_step import selective_state_step_triton
from blocks.mamba import Mamba, MambaConfig
from blocks.scan import selective_scan_ref, selective_state_step
from tests.test_mamba import extras, scan_inputs

# 5 channels in blocks of 4 and d_state 3 padded to 4: masked lanes; chunks of 4 forward, 8 backward
TILES = ScanTiles(4, 4, 1, 8, 4, 1)
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def run_scan(fn, inputs, with_extras, **kw):
    """y, last state and the gradient of every input of a loss that uses both outputs."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    u, delta, A, B, C, *rest = leaves
    y, last = fn(u, delta, A, B, C, return_last_state=True, **(extras(*rest) if with_extras else {}), **kw)
    (y.sin().sum() + last.cos().sum()).backward()
    used = leaves if with_extras else leaves[:5]
    return [y, last] + [t.grad for t in used]


@pytest.mark.parametrize("length", [1, 6, 13, 16])
@pytest.mark.parametrize("with_extras", [False, True])
def test_scan_matches_ref(length, with_extras):
    inputs = scan_inputs(batch=2, d_inner=5, d_state=3, length=length, seed=length)
    expected = run_scan(selective_scan_ref, inputs, with_extras)
    got = run_scan(selective_scan_triton, inputs, with_extras, tiles=TILES)
    for name, g, e in zip(["y", "last"] + NAMES, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("prefetch,bc_fp32,bc_atomic", [(False, False, False), (True, True, False), (True, False, True)])
def test_scan_backward_variants_match_ref(prefetch, bc_fp32, bc_atomic):
    # the backward without its one-chunk-ahead loads, with fp32 copies of B and C, with dB and dC summed over
    # the channel blocks (two of them here) by atomic adds
    inputs = scan_inputs(batch=2, d_inner=5, d_state=3, length=13, seed=21)
    tiles = TILES._replace(bwd_prefetch=prefetch, bc_fp32=bc_fp32, bc_atomic=bc_atomic)
    expected = run_scan(selective_scan_ref, inputs, True)
    got = run_scan(selective_scan_triton, inputs, True, tiles=tiles)
    for name, g, e in zip(["y", "last"] + NAMES, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_scan_without_softplus_or_state_gradient():
    # delta used as given (no bias, no softplus); only y is used, so the last state gets no gradient
    u, delta, A, B, C, D, z, *_ = scan_inputs(batch=1, d_inner=4, d_state=2, length=9, seed=5)
    grads = []
    for fn, kw in ((selective_scan_ref, {}), (selective_scan_triton, dict(tiles=TILES))):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z)]
        fn(*leaves[:5], D=leaves[5], z=leaves[6], **kw).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_scan_layouts_and_dtypes():
    # (B, L, D) views, as the mixer passes them, give the same result and a (B, L, D)-laid-out output
    u, delta, A, B, C, D, z, bias, _ = scan_inputs(batch=2, d_inner=5, d_state=3, length=11, seed=7)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta, B, C, z)]
    y_ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    y = selective_scan_triton(*views[:2], A, *views[2:4], D, views[4], bias, True, tiles=TILES)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y.stride(1) == 1
    half = [t.half() for t in (u, delta, B, C, z)]
    y16 = selective_scan_triton(*half[:2], A, *half[2:4], D, half[4], bias, True, tiles=TILES)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), y_ref, rtol=2e-2, atol=2e-2)


def test_scan_strong_decay_is_finite():
    u, delta, A, B, C, *_ = scan_inputs(batch=1, d_inner=4, d_state=4, length=20, seed=3)
    delta, A = delta * 50 + 5, A * 4  # sum of delta * A about -1e4 within a chunk
    got = run_scan(selective_scan_triton, (u, delta, A, B, C), False, tiles=TILES)
    expected = run_scan(selective_scan_ref, (u, delta, A, B, C), False)
    assert all(torch.isfinite(t).all() for t in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_scan_bad_tiles_or_fp64_raise():
    u, delta, A, B, C, *_ = scan_inputs()
    with pytest.raises(ValueError, match="multiple of the forward"):
        selective_scan_triton(u, delta, A, B, C, tiles=ScanTiles(8, 4, 1, 4, 4, 1))
    with pytest.raises(ValueError, match="fp32 state"):
        selective_scan_triton(*(t.double() for t in (u, delta, A, B, C)))


@pytest.mark.parametrize(
    "K, length, bias, silu, channels_last", [(4, 13, True, True, True), (4, 10, True, False, False), (3, 5, False, True, False), (1, 9, True, True, True)]
)
def test_conv_matches_ref(K, length, bias, silu, channels_last):
    torch.manual_seed(K + length)
    conv = nn.Conv1d(6, 6, K, groups=6, padding=K - 1, bias=bias)
    x = torch.randn(2, length, 6).transpose(1, 2) if channels_last else torch.randn(2, 6, length)
    x.requires_grad_()
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    y_ref = causal_conv1d(x, conv)
    y_ref = F.silu(y_ref) if silu else y_ref
    gy = torch.randn_like(y_ref)
    expected = [y_ref, *torch.autograd.grad(y_ref, params, gy)]
    y = causal_conv1d_triton(x, conv.weight[:, 0], conv.bias, silu=silu)
    got = [y, *torch.autograd.grad(y, params, gy)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert (y.stride(1) == 1) == channels_last


@pytest.mark.parametrize("fused_inner", [True, False])
def test_mixer_triton_backend_matches_torch(fused_inner, monkeypatch):
    # training through the one autograd function of blocks/kernels/mamba_inner.py, or through the kernels
    # composed by autograd: the same values and gradients as the reference, parameters and input alike
    import blocks.kernels.mamba_inner as inner
    import blocks.mamba

    monkeypatch.setattr(blocks.mamba, "FUSED_INNER", fused_inner)
    calls = []
    monkeypatch.setattr(blocks.mamba, "mamba_inner_triton", lambda *a: calls.append(1) or inner.mamba_inner_triton(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 11, 8)
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        mixer = Mamba(8, MambaConfig(d_state=3, backend=backend, conv_bias=True))  # d_inner 16
        with torch.no_grad():  # non-trivial values where init leaves zeros or ones
            mixer.D.add_(torch.randn(16))
            mixer.conv1d.bias.add_(torch.randn(16) * 0.1)
        x_ = x.clone().requires_grad_()
        y = mixer(x_)
        y.square().sum().backward()
        outs.append([y, x_.grad] + [p.grad for p in mixer.parameters()])
    assert len(calls) == int(fused_inner)
    names = ["y", "x"] + [n for n, _ in mixer.named_parameters()]
    for name, t, r in zip(names, *outs):
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_mixer_trains_under_autocast(monkeypatch):
    # bf16-mixed training: fp32 weights, in_proj's output in the autocast dtype, a backward outside autocast.
    # The fused function must multiply the same operands as the composed path (fp16 here: the interpreter's)
    import blocks.mamba

    x = torch.randn(2, 11, 8)
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(blocks.mamba, "FUSED_INNER", fused)
        torch.manual_seed(1)
        mixer = Mamba(8, MambaConfig(d_state=3, backend="triton"))
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            y = mixer(x_)
        assert y.dtype == torch.float16
        y.float().square().sum().backward()
        outs.append([y.float(), x_.grad] + [p.grad for p in mixer.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in mixer.parameters())
    for t, r in zip(*outs):
        torch.testing.assert_close(t, r, rtol=1e-3, atol=1e-4)


def test_auto_backend_runs_triton_when_forced():
    torch.manual_seed(1)
    mixer = Mamba(8, MambaConfig(d_state=3))
    assert mixer.backend == "auto" and mixer._backend(torch.zeros(1)) == "torch"
    with force_triton():
        assert mixer._backend(torch.zeros(1)) == "triton"


def test_mamba_ssm_backend_without_the_package_says_how_to_install():
    pytest.importorskip("triton")
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install \.\[cuda\]"):
            Mamba(8, MambaConfig(backend="mamba_ssm"))
    else:
        pytest.skip("mamba-ssm is installed")


def test_state_step_matches_ref():
    u, delta, A, B, C, D, z, bias, state = scan_inputs(batch=2, d_inner=5, d_state=3, length=1, seed=11)
    args = (u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0])
    state_ref = state.clone()
    y_ref = selective_state_step(state_ref, *args, D=D, z=z[..., 0], dt_bias=bias, dt_softplus=True)
    y = selective_state_step_triton(state, *args, D=D, z=z[..., 0], dt_bias=bias, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [4, 3])
def test_conv_step_matches_ref(K):
    torch.manual_seed(K)
    conv = nn.Conv1d(6, 6, K, groups=6, padding=K - 1)
    state = torch.randn(2, 6, K)
    x = torch.randn(2, 6)
    state_ref = state.clone()
    y_ref = F.silu(causal_conv1d_step(x, conv, state_ref))
    y = causal_conv1d_step_triton(x, state, conv.weight[:, 0], conv.bias, silu=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref)


def test_triton_recurrent_step_matches_parallel_forward():
    # prefill 5 tokens, then decode 4 one at a time: the same outputs as one parallel pass over all 9
    torch.manual_seed(2)
    mixer = Mamba(8, MambaConfig(d_state=3, backend="triton")).eval()
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        y_full = mixer(x)
        cache = mixer.allocate_cache(2, 9)
        ys = [mixer(x[:, :5], cache)] + [mixer.step(x[:, t], cache)[:, None] for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-5, atol=1e-5)


def test_auto_backend_takes_mamba_ssm_only_where_it_measured_faster(monkeypatch):
    """The measured pick of blocks/scan_backend.py, with mamba-ssm's scan stood in for by the reference and
    a timer that says which is faster: kept per shape and pass, and never taken when mamba-ssm is absent."""
    from blocks import mamba as mamba_mod
    from blocks import scan_backend
    from blocks.scan import selective_scan_chunked

    calls = []
    monkeypatch.setattr(scan_backend, "_choices", {})

    def theirs(*args, **kw):
        calls.append("mamba_ssm")
        return selective_scan_chunked(*args, **kw)

    def ours(*args, **kw):
        calls.append("triton")
        return selective_scan_chunked(*args, **kw)

    def timer(fn):  # runs the case, then reports mamba-ssm faster for the forward only
        before = len(calls)
        fn()
        name = calls[before]
        return 1.0 if (name == "mamba_ssm") == (not torch.is_grad_enabled()) else 2.0

    B, L, E, N = 2, 11, 16, 3
    args = (torch.randn(B, E, L), torch.randn(B, E, L), -torch.rand(E, N), torch.randn(B, N, L), torch.randn(B, N, L))
    kw = dict(D=torch.randn(E), z=torch.randn(B, E, L), delta_bias=None, delta_softplus=True)
    monkeypatch.setattr(scan_backend, "mamba_ssm_scan", lambda: None)
    assert scan_backend.choose(args, kw, False, ours, timer) == "triton" and not calls
    monkeypatch.setattr(scan_backend, "mamba_ssm_scan", lambda: theirs)
    assert scan_backend.choose(args, kw, False, ours, timer) == "mamba_ssm"
    assert scan_backend.choose(args, kw, True, ours, timer) == "triton"
    n = len(calls)
    assert scan_backend.choose(args, kw, False, ours, timer) == "mamba_ssm" and len(calls) == n
    # inputs of another layout are another case: measured again
    t_args = (args[0].transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    scan_backend.choose(t_args, kw, False, ours, timer)
    assert len(calls) > n

    # inside the mixer: the forward-only pass runs "mamba-ssm's" scan, the training pass the Triton one
    monkeypatch.setattr(mamba_mod, "_mamba_ssm_ops", lambda: (theirs, None))
    monkeypatch.setattr(mamba_mod, "selective_scan_triton", ours)
    fused = mamba_mod.mamba_inner_triton
    monkeypatch.setattr(mamba_mod, "mamba_inner_triton", lambda *a: calls.append("triton, fused") or fused(*a))
    monkeypatch.setattr(mamba_mod, "choose_scan_backend",
                        lambda *a: scan_backend.choose(*a, timer=timer))
    torch.manual_seed(1)
    mixer = Mamba(8, MambaConfig(d_state=3))
    x = torch.randn(2, 11, 8)
    with force_triton():
        with torch.no_grad():
            mixer(x)  # measures both on the mixer's inputs
            calls.clear()
            y_fwd = mixer(x)
        assert calls == ["mamba_ssm"]
        y_train = mixer(x)  # the first training pass measures both scans through the composed path
        assert calls[-1] == "triton"
        calls.clear()
        y_train_fused = mixer(x)  # then takes the fused training path (Triton's scan inside it)
        assert calls == ["triton, fused"]
    torch.testing.assert_close(y_fwd, y_train)
    torch.testing.assert_close(y_train_fused, y_train, rtol=1e-5, atol=1e-5)
