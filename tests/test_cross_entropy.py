"""The cross-entropy kernel (Triton's interpreter on the CPU) against F.cross_entropy on fp32 logits: loss and
logit gradient on fresh random inputs, ignored targets, a vocabulary that is not a multiple of the block,
fp16 logits, out-of-range targets; and the training module's loss dispatching to it."""
from __future__ import annotations

import pytest
import torch

from blocks.kernels import force_triton
from blocks.kernels.cross_entropy import cross_entropy_torch, cross_entropy_triton
from blocks.model import next_token_loss


def _inputs(N: int, V: int, dtype: torch.dtype, seed: int, ignore_every: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(N, V, generator=gen)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    if ignore_every:
        y[::ignore_every] = -100
    return x, y


@pytest.mark.parametrize("N,V,dtype,ignore_every,reduction", [
    (5, 37, torch.float32, 0, "mean"),      # V smaller than a block, not a power of two
    (9, 200, torch.float32, 3, "mean"),     # several blocks, a partial last one, ignored rows
    (7, 129, torch.float16, 2, "sum"),
    (6, 64, torch.float32, 0, "none"),
])
def test_cross_entropy_matches_twin(N, V, dtype, ignore_every, reduction):
    x, y = _inputs(N, V, dtype, seed=N * V, ignore_every=ignore_every)
    g = torch.randn(N) if reduction == "none" else torch.tensor(1.7)
    loss = cross_entropy_triton(x, y, reduction=reduction)
    (dx,) = torch.autograd.grad(loss, x, g)
    x_ref = x.detach().clone().requires_grad_()
    loss_ref = cross_entropy_torch(x_ref, y, reduction=reduction)
    (dx_ref,) = torch.autograd.grad(loss_ref, x_ref, g)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=tol, atol=tol)
    if ignore_every:  # ignored rows: no loss, no gradient
        assert torch.all(dx[::ignore_every] == 0)


def test_cross_entropy_large_logits_are_stable():
    """Logits in the hundreds: the running maximum keeps exp from overflowing."""
    x, y = _inputs(4, 100, torch.float32, seed=3)
    x = (x.detach() * 100).requires_grad_()
    loss = cross_entropy_triton(x, y)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, cross_entropy_torch(x, y), rtol=1e-5, atol=1e-4)


def test_cross_entropy_out_of_range_target_is_nan_and_bad_shapes_raise():
    x, y = _inputs(3, 10, torch.float32, seed=4)
    y[1] = 10
    per_row = cross_entropy_triton(x, y, reduction="none")
    assert torch.isnan(per_row[1]) and torch.isfinite(per_row[[0, 2]]).all()
    with pytest.raises(ValueError, match="logits"):
        cross_entropy_triton(x, y[:2])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_triton(x, y, reduction="avg")


def test_next_token_loss_dispatches_to_the_kernel(monkeypatch):
    """With the kernels forced on, the model's loss goes through the kernel (counted) and equals the reference."""
    import blocks.kernels.cross_entropy as ce

    calls = []
    original = ce.cross_entropy_triton
    monkeypatch.setattr(ce, "cross_entropy_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 50, generator=gen)
    y = torch.randint(0, 50, (2, 6), generator=gen)
    ref = next_token_loss(logits, y)
    assert not calls
    with force_triton():
        out = next_token_loss(logits, y)
    assert calls == [1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
