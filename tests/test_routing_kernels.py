"""Fused routing kernels (under Triton's interpreter on the CPU) against their PyTorch reference twins."""
from __future__ import annotations

import warnings

import pytest
import torch

from blocks.kernels import force_triton
from routers import build_router
from routers.kernels import sinkhorn_topk, sinkhorn_topk_ref, topk_gate, topk_gate_ref


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


GATE_CASES = [  # T, E, k, gate, renormalize
    (64, 1, 1, "softmax", True),
    (100, 3, 2, "softmax", True),
    (300, 8, 3, "sigmoid", True),
    (130, 17, 2, "softmax", False),
    (77, 17, 3, "sigmoid", False),
    (40, 256, 2, "softmax", True),
]


@pytest.mark.parametrize("T,E,k,gate,renormalize", GATE_CASES)
def test_topk_gate_matches_reference(T, E, k, gate, renormalize):
    logits_TE = torch.randn(T, E) * 3
    got = topk_gate(logits_TE, k, gate, renormalize, with_counts=True)
    want = topk_gate_ref(logits_TE, k, gate, renormalize, with_counts=True)
    assert got.expert_ids_TK.dtype == torch.int64 and got.counts_E.dtype == torch.int32
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    assert got.counts_E.sum() == T * k
    assert topk_gate(logits_TE, k, gate, renormalize).counts_E is None


@pytest.mark.parametrize("T,E,k,gate,renormalize", GATE_CASES)
def test_topk_gate_gradients_match_autograd(T, E, k, gate, renormalize):
    logits_TE = torch.randn(T, E) * 2
    dweights_TK, dprobs_TE = torch.randn(T, k), torch.randn(T, E)
    losses = {  # from the weights and the probabilities (a balance loss), and from each alone
        "both": lambda g: (g.weights_TK * dweights_TK).sum() + (g.probs_TE * dprobs_TE).sum(),
        "weights": lambda g: (g.weights_TK * dweights_TK).sum(),
        "probs": lambda g: g.probs_TE.mean(0).square().sum(),
    }
    for name, loss_fn in losses.items():
        grads = []
        for fn in (topk_gate, topk_gate_ref):
            x_TE = logits_TE.clone().requires_grad_()
            loss_fn(fn(x_TE, k, gate, renormalize)).backward()
            grads.append(x_TE.grad)
        torch.testing.assert_close(grads[0], grads[1], msg=name)


def test_topk_gate_breaks_ties_toward_lower_index():
    logits_TE = torch.zeros(5, 6)
    logits_TE[:, 4] = 1.0
    gate = topk_gate(logits_TE, 3, with_counts=True)
    assert gate.expert_ids_TK.tolist() == [[4, 0, 1]] * 5
    assert gate.counts_E.tolist() == [5, 5, 0, 0, 5, 0]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid, exp(1e4) = inf
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_topk_gate_is_finite_for_extreme_logits(gate):
    T, E, k = 64, 8, 3
    logits_TE = torch.where(torch.rand(T, E) < 0.5, -1e4, 1e4) + torch.randn(T, E)
    logits_TE[:, 5] = 1e4  # a positive logit in every row (with sigmoid, renormalising k zeros is 0 / 0)
    x_TE = logits_TE.clone().requires_grad_()
    out = topk_gate(x_TE, k, gate)
    (out.weights_TK.sum() + out.probs_TE.square().sum()).backward()
    for t in (out.weights_TK, out.probs_TE, x_TE.grad):
        assert torch.isfinite(t).all()
    # the k largest logits, best first, even where the probabilities round to equal values
    torch.testing.assert_close(logits_TE.gather(1, out.expert_ids_TK), logits_TE.topk(k, dim=-1).values)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter reduces NaNs with numpy
def test_kernels_give_valid_distinct_experts_for_nan_logits():
    logits_TE = torch.randn(6, 5)
    logits_TE[1] = float("nan")
    logits_TE[3, 2] = float("nan")
    for ids_TK in (topk_gate(logits_TE, 3).expert_ids_TK, sinkhorn_topk(logits_TE, 3)):
        assert ((ids_TK >= 0) & (ids_TK < 5)).all()
        assert all(len(set(row)) == 3 for row in ids_TK.tolist())


SINKHORN_CASES = [  # T, E, k, temperature, n_iters
    (64, 1, 1, 0.5, 8),
    (100, 3, 2, 0.5, 8),
    (300, 8, 3, 1.0, 3),
    (257, 17, 2, 0.5, 8),
    (40, 256, 2, 0.3, 2),
]


@pytest.mark.parametrize("T,E,k,temperature,n_iters", SINKHORN_CASES)
def test_sinkhorn_topk_matches_reference(T, E, k, temperature, n_iters):
    logits_TE = torch.randn(T, E) * 2 + torch.linspace(2, 0, E)  # skewed, so the balancing matters
    got = sinkhorn_topk(logits_TE, k, temperature, n_iters)
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, sinkhorn_topk_ref(logits_TE, k, temperature, n_iters), rtol=0, atol=0)


@pytest.mark.parametrize("T,E,block_elements,programs", [
    (160, 8, 256, 1),  # blocks of 32 tokens: one program of 5 blocks
    (160, 8, 256, 2),  # two programs of 3 blocks, the last block empty
    (60, 17, 128, 5),  # blocks of 4 tokens, 5 programs of 3 blocks, partials combined in two chunks of 4
])
def test_sinkhorn_topk_reduces_over_blocks_and_programs(monkeypatch, T, E, block_elements, programs):
    import routers.kernels.sinkhorn as fused

    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(fused, "_MAX_PROGRAMS", programs)
    logits_TE = torch.randn(T, E) * 2
    torch.testing.assert_close(sinkhorn_topk(logits_TE, 2), sinkhorn_topk_ref(logits_TE, 2), rtol=0, atol=0)


def test_sinkhorn_topk_is_valid_for_extreme_logits():
    T, E, k = 64, 8, 2
    logits_TE = torch.where(torch.rand(T, E) < 0.5, -1e4, 1e4) + torch.randn(T, E)
    logits_TE[:, 0] = 1e4  # every token saturates expert 0
    ids_TK = sinkhorn_topk(logits_TE, k)
    assert ((ids_TK >= 0) & (ids_TK < E)).all() and (ids_TK[:, 0] != ids_TK[:, 1]).all()
    counts_E = torch.bincount(ids_TK[:, 0], minlength=E)
    assert counts_E.max() < T  # the plan spreads the tokens that all prefer expert 0


def test_kernels_reject_bad_arguments():
    with pytest.raises(ValueError, match="gate"):
        topk_gate(torch.randn(4, 3), 1, "relu")
    with pytest.raises(ValueError, match="k must be"):
        topk_gate(torch.randn(4, 3), 4)
    with pytest.raises(ValueError, match="fp32"):
        sinkhorn_topk(torch.randn(4, 3, dtype=torch.float64), 1)


ROUTER_CASES = [  # name, E, k, cfg, training
    ("top1", 8, 1, None, True),
    ("topk", 17, 2, None, True),
    ("topk", 3, 3, {"renormalize": False}, True),
    ("topk", 8, 2, None, False),
    ("sinkhorn", 8, 1, {"z_loss_coef": 1e-3}, True),
    ("sinkhorn", 17, 2, None, True),
    ("sinkhorn", 8, 2, None, False),
]


@pytest.mark.parametrize("name,E,k,cfg,training", ROUTER_CASES)
def test_routers_give_the_same_routing_through_the_kernels(name, E, k, cfg, training):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        router = build_router(name, E, k, cfg).train(training)
    logits_TE = torch.randn(96, E) * 2
    scale_TK = torch.randn(96, k)
    routings, grads = [], []
    for forced in (False, True):
        x_TE = logits_TE.clone().requires_grad_()
        if forced:
            with force_triton():
                routing = router.route(x_TE)
        else:
            routing = router.route(x_TE)
        loss = (routing.weights_TK * scale_TK).sum() + sum(routing.aux_losses.values())
        loss.backward()
        routings.append(routing)
        grads.append(x_TE.grad)
    plain, fused = routings
    torch.testing.assert_close(fused.expert_ids_TK, plain.expert_ids_TK, rtol=0, atol=0)
    torch.testing.assert_close(fused.weights_TK, plain.weights_TK)
    torch.testing.assert_close(fused.probs_TE, plain.probs_TE)
    assert fused.mask_TK is None and plain.mask_TK is None
    assert fused.aux_losses.keys() == plain.aux_losses.keys()
    for key in plain.aux_losses:
        torch.testing.assert_close(fused.aux_losses[key], plain.aux_losses[key])
    torch.testing.assert_close(grads[1], grads[0])
