"""Balancing across steps: the aux-loss-free selection bias (DeepSeek-V3) and the global-batch balance loss
(Qiu et al. 2025): hand-computed values, equality over micro-batch splits, the fused gate with a bias."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from blocks.kernels import force_triton
from blocks.model import LM, ModelConfig
from blocks.moe import MoEConfig
from routers import StepLoad, TopKConfig, build_router
from routers.kernels import topk_gate, topk_gate_ref
from test_analysis import NoHostSync

LN3 = math.log(3.0)


def router(E: int = 4, k: int = 1, **cfg):
    return build_router("topk", E, k, TopKConfig(**cfg)).train()


def one_hot_logits(expert_ids: list[int], E: int, margin: float = 4.0) -> torch.Tensor:
    """Logits whose top-1 expert is expert_ids[t] for token t (by `margin`)."""
    return F.one_hot(torch.tensor(expert_ids), E).float() * margin


# ------------------------------------------------------------------ the bias update rule

def test_bias_update_rule_by_hand():
    r = router(E=4, bias_update_rate=0.1, aux_loss_coef=0.0)
    assert r.load.bias_E.tolist() == [0.0] * 4
    # one step in two micro-batches: loads 3, 1, 0, 2 (mean 1.5) -> errors -1.5, 0.5, 1.5, -0.5
    r.route(one_hot_logits([0, 0, 1], 4))
    r.route(one_hot_logits([0, 3, 3], 4))
    r.end_step()
    torch.testing.assert_close(r.load.bias_E, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    # loads 1, 1, 1, 1: every error is 0, the bias stays
    r.route(one_hot_logits([0, 1, 2, 3], 4, margin=10.0))
    r.end_step()
    torch.testing.assert_close(r.load.bias_E, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    # loads 4, 0, 0, 0 (a bias gap of 0.2 cannot outweigh a probability gap near 1)
    r.route(one_hot_logits([0, 0, 0, 0], 4, margin=10.0))
    r.end_step()
    torch.testing.assert_close(r.load.bias_E, torch.tensor([-0.2, 0.2, 0.2, 0.0]))
    assert r.load.bias_steps.tolist() == [-2, 2, 2, 0]
    r.end_step()  # a step without a training forward leaves the bias alone
    assert r.load.bias_steps.tolist() == [-2, 2, 2, 0]


def test_bias_selects_experts_but_gate_weights_stay_the_scores():
    r = router(E=3, k=1, bias_update_rate=0.1, aux_loss_coef=0.0)
    r.load.bias_steps.copy_(torch.tensor([-1, 0, 2]))  # b = -0.1, 0, 0.2
    logits = torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])
    probs = torch.softmax(logits, -1)
    routing = r.route(logits)
    want = (probs + torch.tensor([-0.1, 0.0, 0.2])).argmax(-1)
    assert want.tolist() == [1, 2, 0] and routing.expert_ids_TK[:, 0].tolist() == [1, 2, 0]
    torch.testing.assert_close(routing.weights_TK, probs.gather(1, routing.expert_ids_TK))
    torch.testing.assert_close(routing.probs_TE, probs)
    r.end_step()  # loads 1, 1, 1: the bias stays
    assert r.load.bias_steps.tolist() == [-1, 0, 2]
    # the bias routes in eval too (generation uses the trained rule), but eval does not count the load
    r.eval()
    assert r.route(logits).expert_ids_TK[:, 0].tolist() == [1, 2, 0]
    r.route(one_hot_logits([2, 2, 2], 3))
    r.end_step()
    assert r.load.bias_steps.tolist() == [-1, 0, 2]


def test_bias_balances_a_skewed_router_over_steps():
    T, E = 256, 8
    torch.manual_seed(0)
    logits = torch.randn(T, E) + torch.linspace(1.5, 0.0, E)  # expert 0 preferred by most tokens
    r = router(E=E, k=2, bias_update_rate=0.002, aux_loss_coef=0.0)

    def load_cv() -> float:  # in eval mode: routed with the bias, not counted as a training step
        counts = torch.bincount(r.eval().route(logits).expert_ids_TK.reshape(-1), minlength=E).float()
        r.train()
        return (counts.std(correction=0) / counts.mean()).item()

    before = load_cv()
    for _ in range(300):
        r.route(logits)
        r.end_step()
    assert before > 0.5 and load_cv() < 0.1 * before


def test_bias_is_checkpointed_exactly_and_survives_a_dtype_cast():
    r = router(E=4, bias_update_rate=1e-3, aux_loss_coef=0.0)
    r.load.bias_steps.copy_(torch.tensor([3, -1, 0, 7]))
    state = r.state_dict()
    assert set(state) == {"load.bias_steps"}
    fresh = router(E=4, bias_update_rate=1e-3, aux_loss_coef=0.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.load.bias_E, torch.tensor([3e-3, -1e-3, 0.0, 7e-3]))
    fresh.to(torch.bfloat16)
    assert fresh.load.bias_steps.dtype == torch.int64
    assert set(router(E=4).state_dict()) == set()  # no balancing state without the options


def test_routing_and_load_counting_never_synchronise_with_the_host():
    r = router(E=4, k=2, bias_update_rate=1e-3, balance_scope="global_batch")
    logits = torch.randn(10, 4)
    with NoHostSync():
        r.route(logits)
        r.route(logits)
    r.end_step()
    with NoHostSync():
        r.route(logits)


def test_step_load_all_reduces_over_ranks(tmp_path, monkeypatch):
    """With torch.distributed initialised, end_step sums the load over ranks (one process here: the reduction
    is called, and its sum taken; several processes are another test's business)."""
    calls = []
    real_all_reduce = dist.all_reduce

    def all_reduce(t, op=dist.ReduceOp.SUM, **kwargs):
        calls.append(t.clone())
        real_all_reduce(t, op=op, **kwargs)
        t.mul_(2)  # as if a second rank had seen the same load

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        load = StepLoad(3, bias_update_rate=0.5, keep_counts=True)
        load.observe(torch.tensor([2, 1, 0]))
        load.end_step()
    finally:
        dist.destroy_process_group()
    assert len(calls) == 1 and calls[0].tolist() == [2, 1, 0]
    assert load.last_counts.tolist() == [4, 2, 0]
    torch.testing.assert_close(load.frequencies(), torch.tensor([4 / 6, 2 / 6, 0.0]))
    torch.testing.assert_close(load.bias_E, torch.tensor([-0.5, 0.0, 0.5]))


def test_bad_balancing_options_raise():
    with pytest.raises(ValueError, match="balance_scope"):
        TopKConfig(balance_scope="batch")
    with pytest.raises(ValueError, match="bias_update_rate"):
        TopKConfig(bias_update_rate=-1e-3)
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        TopKConfig(gate="relu")


# ------------------------------------------------------------------ the global-batch balance loss

def hand_logits() -> tuple[torch.Tensor, torch.Tensor]:
    # micro-batch a: probs [1/4, 3/4], [3/4, 1/4] -> experts 1, 0; micro-batch b: [1/4, 3/4] twice -> 1, 1
    a = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    b = torch.tensor([[0.0, LN3], [0.0, LN3]])
    return a, b


def test_global_batch_loss_by_hand():
    a, b = hand_logits()
    glob = router(E=2, aux_loss_coef=1.0, z_loss_coef=0.0, balance_scope="global_batch")
    micro = router(E=2, aux_loss_coef=1.0, z_loss_coef=0.0)
    # first step: no global batch yet, f uniform: E * sum_i (1/E) P_i = 1 whatever P
    assert glob.route(a).aux_losses["balance"].item() == pytest.approx(1.0)
    assert glob.route(b).aux_losses["balance"].item() == pytest.approx(1.0)
    glob.end_step()  # the step's global batch: experts 1, 0, 1, 1 -> f = [1/4, 3/4]
    torch.testing.assert_close(glob.load.frequencies(), torch.tensor([0.25, 0.75]))
    # a: P = [1/2, 1/2]: 2 * (1/4 * 1/2 + 3/4 * 1/2) = 1; b: P = [1/4, 3/4]: 2 * (1/16 + 9/16) = 1.25
    assert glob.route(a).aux_losses["balance"].item() == pytest.approx(1.0)
    assert glob.route(b).aux_losses["balance"].item() == pytest.approx(1.25)
    # per micro-batch instead: a: f = [1/2, 1/2] -> 1; b: f = [0, 1] -> 2 * 3/4 = 1.5
    assert micro.route(a).aux_losses["balance"].item() == pytest.approx(1.0)
    assert micro.route(b).aux_losses["balance"].item() == pytest.approx(1.5)


def step_gradients(model: LM, idx_BL: torch.Tensor, n_micro: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step's loss and gradients with the batch split into n_micro equal micro-batches, each
    loss divided by n_micro as gradient accumulation does; then end_step."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in idx_BL.chunk(n_micro):
        logits, aux = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) + sum(aux.values())
        (loss / n_micro).backward()
        total += loss.item() / n_micro
    model.end_step()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scope", ["global_batch", "micro_batch"])
def test_global_batch_loss_is_the_same_for_every_micro_batch_split(scope):
    """The step's loss and every gradient, for the same global batch split into 1, 2 or 4 micro-batches:
    equal with the global-batch loss; the per-micro-batch loss differs with the split."""
    results = []
    for n_micro in (1, 2, 4):
        torch.manual_seed(0)
        router_cfg = {"aux_loss_coef": 0.5, "z_loss_coef": 0.0, "balance_scope": scope}
        model = LM(ModelConfig(vocab_size=32, d_model=16, n_layers=4, ffn_dim=32), "mamba",
                   moe_cfg=MoEConfig(num_experts=4, top_k=2, router="topk", router_cfg=router_cfg)).train()
        batches = torch.randint(0, 32, (2, 8, 13), generator=torch.Generator().manual_seed(1))
        step_gradients(model, batches[0], n_micro)  # a first step, so that the second has a global batch behind it
        results.append(step_gradients(model, batches[1], n_micro))
    (loss1, grads1), *others = results
    for loss, grads in others:
        if scope == "global_batch":
            assert loss == pytest.approx(loss1, rel=1e-6)
            for name in grads1:
                torch.testing.assert_close(grads[name], grads1[name], rtol=1e-4, atol=1e-6, msg=name)
        else:
            gate = "layers.1.mlp.gate.weight"
            assert loss != pytest.approx(loss1, rel=1e-6) or not torch.allclose(grads[gate], grads1[gate])


def test_global_frequencies_gather_every_micro_batch_of_the_step():
    torch.manual_seed(0)
    logits = torch.randn(24, 4) * 2
    frequencies = []
    for n_micro in (1, 3, 6):
        r = router(E=4, k=2, balance_scope="global_batch")
        for chunk in logits.chunk(n_micro):
            r.route(chunk)
        r.end_step()
        frequencies.append(r.load.frequencies())
    counts = torch.bincount(torch.topk(logits, 2).indices.reshape(-1), minlength=4)
    for f in frequencies:
        torch.testing.assert_close(f, counts / counts.sum())


# ------------------------------------------------------------------ the fused gate with a selection bias

BIAS_CASES = [(100, 3, 2, "softmax", True), (300, 8, 3, "sigmoid", True), (130, 17, 2, "softmax", False),
              (64, 8, 1, "sigmoid", False)]


@pytest.mark.parametrize("T,E,k,gate,renormalize", BIAS_CASES)
def test_topk_gate_with_bias_matches_reference(T, E, k, gate, renormalize):
    torch.manual_seed(0)
    logits_TE = torch.randn(T, E) * 2
    bias_E = torch.randn(E) * 0.2
    got = topk_gate(logits_TE, k, gate, renormalize, with_counts=True, bias_E=bias_E)
    want = topk_gate_ref(logits_TE, k, gate, renormalize, with_counts=True, bias_E=bias_E)
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    unbiased = topk_gate_ref(logits_TE, k, gate, renormalize)
    assert not torch.equal(got.expert_ids_TK, unbiased.expert_ids_TK)  # the bias changed some choices
    probs = torch.softmax(logits_TE, -1) if gate == "softmax" else torch.sigmoid(logits_TE)
    chosen = probs.gather(1, got.expert_ids_TK)
    torch.testing.assert_close(got.weights_TK, chosen / chosen.sum(-1, keepdim=True) if renormalize and k > 1 else chosen)
    # gradients through the weights and the probabilities, as the router's losses take them
    grads = []
    for fn in (topk_gate, topk_gate_ref):
        x_TE = logits_TE.clone().requires_grad_()
        g = fn(x_TE, k, gate, renormalize, bias_E=bias_E)
        (g.weights_TK.square().sum() + g.probs_TE.mean(0).square().sum()).backward()
        grads.append(x_TE.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_topk_gate_bias_ties_go_to_the_lower_index():
    logits_TE = torch.zeros(4, 6)
    bias_E = torch.tensor([0.0, 0.1, 0.1, 0.0, 0.2, 0.0])
    assert topk_gate(logits_TE, 3, bias_E=bias_E).expert_ids_TK.tolist() == [[4, 1, 2]] * 4
    with pytest.raises(ValueError, match="bias_E"):
        topk_gate(logits_TE, 2, bias_E=torch.zeros(5))


@pytest.mark.parametrize("gate,k", [("softmax", 2), ("sigmoid", 1)])
def test_router_with_bias_is_the_same_on_the_kernel_path(gate, k):
    torch.manual_seed(0)
    logits = torch.randn(40, 8)
    routings = []
    for forced in (False, True):
        r = router(E=8, k=k, gate=gate, bias_update_rate=0.05, balance_scope="global_batch")
        r.load.bias_steps.copy_(torch.tensor([2, -1, 0, 3, -2, 1, 0, -3]))
        r.load.last_counts.copy_(torch.tensor([5, 1, 2, 9, 0, 3, 3, 1]))
        if forced:
            with force_triton():
                routing = r.route(logits)
        else:
            routing = r.route(logits)
        r.end_step()  # this step's load becomes last_counts and moves the bias
        routings.append((routing, r.load.last_counts.clone(), r.load.bias_steps.clone()))
    (a, counts_a, bias_a), (b, counts_b, bias_b) = routings
    for name in ("expert_ids_TK", "weights_TK", "probs_TE"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), msg=name)
    assert a.aux_losses.keys() == b.aux_losses.keys() == {"balance", "z"}
    for name in a.aux_losses:
        torch.testing.assert_close(b.aux_losses[name], a.aux_losses[name], msg=name)
    assert counts_a.tolist() == counts_b.tolist() and counts_a.sum() == 40 * k
    assert bias_a.tolist() == bias_b.tolist()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_updates_the_bias_once_per_optimizer_step(tmp_path, accumulate):
    """Through run.py's training path: the bias moves (the step hook is called) by one rate-sized sign step per
    optimizer step per expert, however many micro-batches the step accumulates."""
    from conftest import tiny_argv
    from experiments.checkpoint import load_checkpoint
    from experiments.config import compose
    from experiments.train import train

    steps = 3
    cfg = compose(tiny_argv(tmp_path, "router=aux_free", f"trainer.max_steps={steps}", "trainer.val_every=3",
                            f"trainer.accumulate_grad_batches={accumulate}"))
    result = train(cfg)
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    sign_steps = [v for k, v in state.items() if k.endswith("load.bias_steps")]
    assert sign_steps, "no aux-loss-free router in the model"
    # each expert moves by -1, 0 or +1 per optimizer step (a load equal to the mean leaves it): never more
    # than `steps` in all, and an unbalanced tiny router does move
    assert all(s.abs().max() <= steps for s in sign_steps) and any(s.abs().sum() > 0 for s in sign_steps)
