"""The router-logits kernel (Triton's interpreter on the CPU) against F.linear on fp32 copies: logits and the
gradients of x, W and b on fresh random inputs, fp32 and fp16 x, with and without a bias, row counts that
leave partial blocks and several row blocks per backward program; and the MoE layer dispatching to it."""
from __future__ import annotations

import pytest
import torch

from blocks.kernels import force_triton
from blocks.kernels.gate import gate_logits_torch, gate_logits_triton
from blocks.moe import MoE, MoEConfig


def _run(fn, x, w, b, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = fn(x, w, b)
    leaves = [x, w] + ([b] if b is not None else [])
    return out, torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("T,D,E,dtype,bias", [
    (5, 24, 4, torch.float32, True),     # fewer rows than a block, D not a multiple of it
    (70, 40, 8, torch.float16, True),    # several row blocks for each backward program
    (33, 16, 3, torch.float32, False),   # E not a power of two, no bias
])
def test_gate_logits_match_twin(T, D, E, dtype, bias):
    gen = torch.Generator().manual_seed(T * D + E)
    x = torch.randn(T, D, generator=gen).to(dtype)
    w, b = torch.randn(E, D, generator=gen) / D ** 0.5, (torch.randn(E, generator=gen) if bias else None)
    g = torch.randn(T, E, generator=gen)
    out, grads = _run(gate_logits_triton, x, w, b, g)
    out_ref, grads_ref = _run(gate_logits_torch, x, w, b, g)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in zip(grads, grads_ref):  # dx (in x's dtype), dW, db
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_gate_logits_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="weight"):
        gate_logits_triton(torch.zeros(3, 8), torch.zeros(4, 6), None)


def test_moe_layer_routes_with_the_kernel(monkeypatch):
    """Forced onto the kernels, the layer's logits come from the gate kernel (counted), and its output and
    router gradient equal those of the PyTorch path."""
    import blocks.kernels.gate as gate

    calls = []
    original = gate.gate_logits_triton
    monkeypatch.setattr(gate, "gate_logits_triton", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=1, router="topk"), 24)
    x = torch.randn(2, 5, 16)
    y_ref, _ = moe(x)
    (gw_ref,) = torch.autograd.grad(y_ref.square().sum(), [moe.gate.weight])
    with force_triton():
        y, _ = moe(x)
        (gw,) = torch.autograd.grad(y.square().sum(), [moe.gate.weight])
    assert calls == [1]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
