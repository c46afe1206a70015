"""MoE Triton kernels (run by Triton's interpreter on the CPU, fp32) against their PyTorch twins:
permutation, grouped GEMMs, GLU, and the whole expert computation forward and backward, with uneven
and empty experts, dropped slots and top-k > 1; and the MoE layer dispatching to them."""
from __future__ import annotations

import pytest
import torch

from blocks.kernels import force_triton
from blocks.kernels.glu import glu_bwd
from blocks.kernels.grouped_gemm import gmm, gmm_glu, gmm_wgrad
from blocks.kernels.moe import moe_experts_triton
from blocks.kernels.permute import permute_slots, permute_slots_ref
from blocks.mlp import glu_activation
from blocks.moe import MoE, MoEConfig, moe_experts_ref


def skewed_ids(T: int, K: int, E: int, gen: torch.Generator, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """Expert ids with a skewed load (expert e drawn with probability ~ 1/(e+1)) and some experts empty."""
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
    p[list(empty)] = 0
    return torch.multinomial(p.expand(T * K, E), 1, generator=gen).view(T, K)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T,K,E,masked", [(1, 1, 1, False), (37, 1, 5, False), (50, 2, 3, True), (700, 2, 8, False),
                                          (300, 3, 64, True), (64, 1, 4, True)])
def test_permute_matches_stable_argsort(T, K, E, masked):
    gen = torch.Generator().manual_seed(T * 31 + E)
    ids = skewed_ids(T, K, E, gen, empty=(E - 1,) if E > 2 else ())
    mask = torch.rand(T, K, generator=gen) > 0.4 if masked else None
    order, offsets = permute_slots(ids, E, mask)
    order_ref, offsets_ref = permute_slots_ref(ids, E, mask)
    assert torch.equal(offsets, offsets_ref)
    assert torch.equal(order, order_ref)  # stable: token order within each expert, dropped slots last


def test_permute_all_dropped():
    ids = torch.zeros(20, 2, dtype=torch.long)
    order, offsets = permute_slots(ids, 3, torch.zeros(20, 2, dtype=torch.bool))
    assert offsets.tolist() == [0, 0, 0, 0]
    assert sorted(order.tolist()) == list(range(40))


def _groups(T, E, gen):
    ids = skewed_ids(T, 1, E, gen, empty=(1,))
    order, offsets = permute_slots_ref(ids, E)
    return order, offsets


@pytest.mark.parametrize("gather,scatter,scale,transpose", [(False, False, False, False), (True, False, False, True),
                                                           (False, True, True, False), (True, True, True, True)])
def test_gmm_matches_per_expert_matmul(gather, scatter, scale, transpose):
    gen = torch.Generator().manual_seed(7)
    T, E, K, N = 45, 4, 24, 40  # K, N not multiples of the interpreter's 16-wide tiles
    order, offsets = _groups(T, E, gen)
    a = torch.randn(T, K, generator=gen)
    w = torch.randn(E, N, K, generator=gen).transpose(1, 2) if transpose else torch.randn(E, K, N, generator=gen)
    s = torch.rand(T, generator=gen)
    out = torch.full((T, N), float("nan")) if scatter else None
    y = gmm(a, w, offsets, T, a_rows=order if gather else None, out=out, y_rows=order if scatter else None,
            scale=s if scale else None)
    a_rows = a[order.long()] if gather else a
    expect = torch.empty(T, N)
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        expect[lo:hi] = a_rows[lo:hi] @ w[e]
    if scale:
        expect = expect * s[:, None]
    if scatter:
        expect = torch.empty_like(expect).index_copy_(0, order.long(), expect)
    assert not y.isnan().any()  # every row written
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gmm_with_fused_glu(activation):
    gen = torch.Generator().manual_seed(3)
    T, E, K, F = 30, 3, 20, 18
    order, offsets = _groups(T, E, gen)
    a, w = torch.randn(T, K, generator=gen), torch.randn(E, K, 2 * F, generator=gen)
    h, act = gmm_glu(a, w, offsets, T, activation, a_rows=order)
    torch.testing.assert_close(h, gmm(a, w, offsets, T, a_rows=order), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act, glu_activation(activation)(h), rtol=1e-5, atol=1e-5)


def test_wgrad_matches_per_expert_sum_and_zero_for_empty_experts():
    gen = torch.Generator().manual_seed(11)
    T, E, K, N = 50, 4, 20, 36
    order, offsets = _groups(T, E, gen)
    a, g = torch.randn(T, K, generator=gen), torch.randn(T, N, generator=gen)
    dw = gmm_wgrad(a, g, offsets, a_rows=order, compute_dtype=torch.float32)
    a_rows = a[order.long()]
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        torch.testing.assert_close(dw[e], a_rows[lo:hi].T @ g[lo:hi], rtol=1e-5, atol=1e-5)
    assert offsets[1] == offsets[2] and dw[1].abs().max() == 0  # expert 1 has no rows


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_glu_backward_matches_autograd(activation):
    gen = torch.Generator().manual_seed(5)
    P, F, T, D = 23, 40, 19, 20
    h = torch.randn(P, 2 * F, generator=gen, requires_grad=True)
    w = torch.rand(P, generator=gen)
    slot = torch.randperm(P, generator=gen).to(torch.int32)
    token = torch.randint(0, T, (P,), generator=gen).to(torch.int32)
    dy = torch.randn(T, D, generator=gen)
    offsets = torch.tensor([0, 10, P - 3], dtype=torch.int32)  # the last 3 rows are dropped slots
    act_ref = glu_activation(activation)(h)
    da = torch.randn(P, F, generator=gen)
    (dh_ref,) = torch.autograd.grad(act_ref, h, da * w[:, None])
    dw = torch.zeros(P)
    dh, wdy = glu_bwd(h.detach(), da, w, slot, dw, offsets, activation, dy, token)
    n = P - 3
    torch.testing.assert_close(dh[:n], dh_ref[:n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw[slot[:n].long()], (da * act_ref.detach()).sum(1)[:n], rtol=1e-5, atol=1e-5)
    assert dw[slot[n:].long()].abs().max() == 0
    torch.testing.assert_close(wdy[:n], (dy[token.long()] * w[:, None])[:n])


@pytest.mark.parametrize(
    "T,K,E,masked,activation",
    [(40, 1, 3, False, "swiglu"), (33, 2, 4, True, "geglu"), (25, 3, 5, False, "swiglu"), (30, 1, 6, True, "swiglu")],
)
def test_moe_experts_kernel_matches_reference_with_gradients(T, K, E, masked, activation):
    gen = torch.Generator().manual_seed(T + K + E)
    D, F = 16, 24
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    ids = skewed_ids(T, K, E, gen, empty=(1,))
    weights = torch.rand(T, K, generator=gen, requires_grad=True)
    mask = torch.rand(T, K, generator=gen) > 0.3 if masked else None
    w_in = torch.randn(E, D, 2 * F, generator=gen, requires_grad=True)
    w_out = torch.randn(E, F, D, generator=gen, requires_grad=True)
    g = torch.randn(T, D, generator=gen)
    results = []
    for fn in (moe_experts_ref, moe_experts_triton):
        y = fn(x, ids, weights, mask, w_in, w_out, activation)
        results.append([y, *torch.autograd.grad(y, [x, weights, w_in, w_out], g)])
    for name, got, ref in zip(("y", "dx", "dweights", "dw_in", "dw_out"), results[1], results[0]):
        assert rel_err(got, ref) < 1e-5, name
    if masked:  # a dropped slot gets no gradient for its gate weight
        assert results[1][2][~mask].abs().max() == 0


def test_moe_layer_dispatches_to_kernels_with_same_result():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, router="topk"), 24)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y_ref, _ = moe(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, moe.w_in, moe.gate.weight])
    with force_triton():
        y, _ = moe(x)
        grads = torch.autograd.grad(y.square().sum(), [x, moe.w_in, moe.gate.weight])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_moe_experts_kernel_under_autocast_gemms_in_the_autocast_dtype(monkeypatch):
    # bf16-mixed: fp32 x (the norm's output) and fp32 weights; the kernels must get x already in the compute
    # dtype (fp16 here, the interpreter's), and match the reference's autocast matmuls, gradients in fp32
    import blocks.kernels.moe as kmoe

    seen = []
    real_glu = kmoe.gmm_glu
    monkeypatch.setattr(kmoe, "gmm_glu", lambda x, *a, **k: seen.append(x.dtype) or real_glu(x, *a, **k))
    gen = torch.Generator().manual_seed(5)
    T, K, E, D, F = 30, 2, 4, 16, 24
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    ids = skewed_ids(T, K, E, gen)
    weights = torch.rand(T, K, generator=gen, requires_grad=True)
    w_in = torch.randn(E, D, 2 * F, generator=gen, requires_grad=True)
    w_out = torch.randn(E, F, D, generator=gen, requires_grad=True)
    g = torch.randn(T, D, generator=gen)
    results = []
    for fn in (moe_experts_ref, moe_experts_triton):
        with torch.autocast("cpu", dtype=torch.float16):
            y = fn(x, ids, weights, None, w_in, w_out, "swiglu")
        results.append([y.float(), *torch.autograd.grad(y.float(), [x, weights, w_in, w_out], g)])
    assert seen == [torch.float16]
    assert all(t.dtype == torch.float32 for t in results[1][1:])
    for name, got, ref in zip(("y", "dx", "dweights", "dw_in", "dw_out"), results[1], results[0]):
        assert rel_err(got, ref) < 3e-3, name


def test_expert_choice_layer_sizes_kernel_buffers_to_capacity():
    import warnings

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        moe = MoE(16, MoEConfig(num_experts=4, top_k=1, router="expert_choice"), 24)
    x = torch.randn(2, 10, 16, requires_grad=True)
    assert moe._max_active_slots(20) == 4 * 5  # capacity ceil(1.0 * 1 * 20 / 4) = 5 tokens per expert
    y_ref, _ = moe(x)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    with force_triton():
        y, _ = moe(x)
        (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
