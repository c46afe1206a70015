"""The residual add + RMSNorm kernel (Triton's interpreter on the CPU) against its PyTorch twin, forward and every
gradient, with and without the block output to add, in fp32 and fp16; and the LM's fused forward path against
its block-by-block path (values and gradients), which must also stay causal."""
from __future__ import annotations

import pytest
import torch

from blocks.kernels import force_triton
from blocks.kernels.add_norm import add_rms_norm_torch, add_rms_norm_triton
from blocks.model import LM, ModelConfig
from blocks.moe import MoEConfig


def _grads(fn, r, out, w, eps, h_dtype, g_r, g_h):
    r = r.detach().clone().requires_grad_()
    out = None if out is None else out.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    r_new, h = fn(r, out, w, eps, h_dtype)
    loss = (h.float() * g_h).sum() + ((r_new * g_r).sum() if out is not None else 0)
    leaves = [r, w] + ([out] if out is not None else [])
    return (r_new, h), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("shape,D,with_out,out_dtype,h_dtype", [
    ((5,), 40, True, torch.float32, torch.float32),          # D not a power of two
    ((2, 7), 64, True, torch.float16, torch.float16),        # a bf16-autocast-like mix, in fp16
    ((3, 4), 24, False, None, torch.float32),                # the first block: nothing to add
    ((11,), 33, False, None, torch.float16),
])
def test_add_norm_matches_twin(shape, D, with_out, out_dtype, h_dtype):
    gen = torch.Generator().manual_seed(D * 7 + len(shape))
    r = 2 * torch.randn(*shape, D, generator=gen)
    out = torch.randn(*shape, D, generator=gen).to(out_dtype) if with_out else None
    w = 1 + 0.3 * torch.randn(D, generator=gen)
    g_r, g_h = torch.randn(*shape, D, generator=gen), torch.randn(*shape, D, generator=gen)
    (r_new, h), grads = _grads(add_rms_norm_triton, r, out, w, 1e-5, h_dtype, g_r, g_h)
    (r_ref, h_ref), grads_ref = _grads(add_rms_norm_torch, r, out, w, 1e-5, h_dtype, g_r, g_h)
    assert h.dtype == h_dtype and r_new.dtype == torch.float32
    tol = 1e-5 if h_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(r_new, r_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
    for got, want in zip(grads, grads_ref):  # dr, dw, d out
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_add_norm_rejects_a_residual_that_is_not_fp32():
    with pytest.raises(ValueError, match="fp32 residual"):
        add_rms_norm_triton(torch.zeros(2, 4, dtype=torch.float16), None, torch.ones(4), 1e-5, torch.float16)


def _tiny(pattern):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=len(pattern), ffn_dim=48, pattern=pattern)
    return LM(cfg, "attention", {"n_heads": 4}, MoEConfig(num_experts=4, top_k=1, router="topk"))


@pytest.mark.parametrize("pattern", [["attention", "moe", "attention", "mlp"], ["attention"]])
def test_lm_fused_forward_equals_block_by_block(pattern, monkeypatch):
    """The kernel path (forced) against the blocks' own forward: logits, aux losses and every gradient; the
    kernel is counted so that the fused path cannot be skipped silently."""
    import blocks.kernels.add_norm as add_norm

    calls = []
    original = add_norm.add_rms_norm_triton
    monkeypatch.setattr(add_norm, "add_rms_norm_triton", lambda *a: calls.append(a[1] is None) or original(*a))
    model = _tiny(pattern)
    idx = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    logits_ref, aux_ref = model(idx)
    grads_ref = torch.autograd.grad(logits_ref.square().mean() + sum(aux_ref.values(), 0), list(model.parameters()),
                                    allow_unused=True)
    assert not calls
    with force_triton():
        logits, aux = model(idx)
        grads = torch.autograd.grad(logits.square().mean() + sum(aux.values(), 0), list(model.parameters()),
                                    allow_unused=True)
    assert calls == [True] + [False] * (len(pattern) - 1)  # norm only for the first block, add + norm after
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert aux.keys() == aux_ref.keys()
    for name, g, g_ref in zip([n for n, _ in model.named_parameters()], grads, grads_ref):
        if g_ref is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_lm_fused_forward_is_causal():
    model = _tiny(["attention", "moe", "attention", "mlp"]).eval()
    idx = torch.randint(0, 40, (1, 8), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 40
    with force_triton(), torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[0, :5], b[0, :5])
    assert not torch.allclose(a[0, 5:], b[0, 5:])


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_forward_and_fused_step_agree_for_blackmamba(batch):
    """Recurrent generation equals the parallel forward on the kernel paths of both (Triton's interpreter):
    the forward with the add + norm kernel, prefill into a cache, then the fused one-token steps
    (blocks.fused_step; batch 1 takes the routed-expert kernels, batch 3 the all-experts path)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=4, ffn_dim=48)
    model = LM(cfg, "mamba", None, MoEConfig(num_experts=4, top_k=1, router="sinkhorn")).eval()
    idx = torch.randint(0, 40, (batch, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, _ = model(idx)  # the blocks' own forward, PyTorch ops
        with force_triton():
            full, _ = model(idx)
            cache = model.allocate_cache(batch, 7)
            prefix, _ = model(idx[:, :3], cache)
            steps = [model.step(idx[:, t], cache) for t in range(3, 7)]
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([prefix, torch.stack(steps, 1)], 1), full, rtol=1e-4, atol=1e-5)
