"""Router properties: balance, capacity, gate weights, auxiliary losses, causality, registry errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from routers import ROUTERS, ExpertChoiceConfig, SinkhornConfig, TopKConfig, build_router
from routers.expert_choice import expert_capacity
from routers.sinkhorn import sinkhorn_log_plan


def make(name: str, num_experts: int = 8, top_k: int = 1, cfg=None, training: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # expert_choice's non-causal warning
        router = build_router(name, num_experts, top_k, cfg)
    return router.train(training)


def load_cv(expert_ids_TK: torch.Tensor, num_experts: int, mask_TK=None) -> float:
    ids = expert_ids_TK if mask_TK is None else expert_ids_TK[mask_TK]
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).float()
    return (counts.std(correction=0) / counts.mean()).item()


def skewed_logits(T: int, E: int) -> torch.Tensor:
    bias_E = torch.linspace(3.0, 0.0, E)  # expert 0 is strongly preferred by every token
    return torch.randn(T, E) + bias_E


def test_sinkhorn_balances_load_better_than_top1():
    T, E = 512, 8
    logits = skewed_logits(T, E)
    top1_cv = load_cv(make("top1", E).route(logits).expert_ids_TK, E)
    sinkhorn_cv = load_cv(make("sinkhorn", E).route(logits).expert_ids_TK, E)
    assert top1_cv > 1.0
    assert sinkhorn_cv < 0.25 * top1_cv


def test_sinkhorn_plan_marginals():
    T, E = 64, 4
    plan_TE = sinkhorn_log_plan(torch.randn(T, E) * 2, temperature=0.5, n_iters=50).exp()
    torch.testing.assert_close(plan_TE.sum(0), torch.full((E,), 1 / E))  # ends with a column scaling
    torch.testing.assert_close(plan_TE.sum(1), torch.full((T,), 1 / T), rtol=1e-3, atol=1e-6)


def test_sinkhorn_is_finite_for_extreme_logits():
    T, E = 32, 8
    logits = torch.where(torch.rand(T, E) < 0.5, -1e4, 1e4)
    logits[:, 0] = 1e4  # every token saturates expert 0
    assert torch.isfinite(sinkhorn_log_plan(logits, 0.5, 8)).all()
    for training in (True, False):
        routing = make("sinkhorn", E, top_k=2, training=training).route(logits)
        assert torch.isfinite(routing.weights_TK).all() and torch.isfinite(routing.probs_TE).all()
        assert ((routing.expert_ids_TK >= 0) & (routing.expert_ids_TK < E)).all()
        assert ((routing.weights_TK >= 0) & (routing.weights_TK <= 1)).all()


def test_sinkhorn_traces_without_data_dependent_control_flow():
    """Fake-tensor tracing fails on .item(), data-dependent branches or loops: none may occur."""
    router = make("sinkhorn", 8, top_k=2)
    graph = make_fx(lambda logits: router.route(logits).expert_ids_TK, tracing_mode="fake")(torch.randn(16, 8))
    assert sum(node.target == torch.ops.aten.logsumexp.default for node in graph.graph.nodes) == 1 + 2 * 8


def test_sinkhorn_eval_is_argmax_with_sigmoid_gate():
    logits = torch.randn(20, 8)
    routing = make("sinkhorn", 8, training=False).route(logits)
    torch.testing.assert_close(routing.expert_ids_TK[:, 0], logits.argmax(-1))
    torch.testing.assert_close(routing.weights_TK[:, 0], torch.sigmoid(logits.max(-1).values))
    assert routing.aux_losses == {}


def test_sinkhorn_gate_is_sigmoid_of_chosen_logit_in_training():
    logits = torch.randn(50, 8)
    routing = make("sinkhorn", 8, top_k=2).route(logits)
    torch.testing.assert_close(routing.weights_TK, torch.sigmoid(logits.gather(1, routing.expert_ids_TK)))


@pytest.mark.parametrize("capacity_factor,top_k", [(1.0, 1), (1.0, 2), (1.5, 1), (0.3, 2)])
def test_expert_choice_fills_every_expert_to_capacity(capacity_factor, top_k):
    T, E = 37, 8
    logits = skewed_logits(T, E)
    routing = make("expert_choice", E, top_k, {"capacity_factor": capacity_factor}).route(logits)
    capacity = expert_capacity(T, E, top_k, capacity_factor)
    assert capacity == min(T, math.ceil(capacity_factor * top_k * T / E))
    assert routing.mask_TK.shape == (T, E)
    assert (routing.mask_TK.sum(0) == capacity).all()
    assert (routing.expert_ids_TK == torch.arange(E)).all()
    probs_TE = torch.softmax(logits, -1)
    torch.testing.assert_close(routing.weights_TK, probs_TE * routing.mask_TK)
    # each expert took its `capacity` highest-probability tokens
    for e in range(E):
        chosen = probs_TE[routing.mask_TK[:, e], e]
        rest = probs_TE[~routing.mask_TK[:, e], e]
        assert rest.numel() == 0 or chosen.min() >= rest.max()


def test_expert_choice_warns_at_construction_and_is_marked_non_causal():
    with pytest.warns(UserWarning, match="not causal"):
        router = build_router("expert_choice", 4, 1)
    assert router.causal is False
    assert make("sinkhorn").causal is False  # batch-global in training
    assert make("topk", top_k=2).causal is True and make("top1").causal is True


def test_expert_choice_eval_falls_back_to_softmax_topk():
    logits = torch.randn(10, 8)
    routing = make("expert_choice", 8, top_k=2, training=False).route(logits)
    weights, ids = torch.softmax(logits, -1).topk(2, dim=-1)
    torch.testing.assert_close(routing.expert_ids_TK, ids)
    torch.testing.assert_close(routing.weights_TK, weights)
    assert routing.mask_TK is None


def test_topk_weights_renormalise():
    logits = torch.randn(30, 8)
    probs = torch.softmax(logits, -1)
    routing = make("topk", 8, top_k=2).route(logits)
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(30))
    raw = make("topk", 8, top_k=2, cfg={"renormalize": False}).route(logits)
    torch.testing.assert_close(raw.weights_TK, probs.gather(1, raw.expert_ids_TK))
    assert (raw.weights_TK.sum(-1) < 1).all()
    torch.testing.assert_close(raw.expert_ids_TK, routing.expert_ids_TK)


def test_top1_gate_is_raw_probability():
    logits = torch.randn(30, 8)
    routing = make("top1", 8).route(logits)
    torch.testing.assert_close(routing.weights_TK[:, 0], torch.softmax(logits, -1).max(-1).values)


def test_aux_losses_match_hand_computation():
    ln3 = math.log(3.0)
    # probs: token 0 [1/4, 3/4], token 1 [3/4, 1/4], tokens 2, 3 [1/4, 3/4]; top-1 experts 1, 0, 1, 1
    logits = torch.tensor([[0.0, ln3], [ln3, 0.0], [0.0, ln3], [0.0, ln3]])
    routing = make("top1", 2, cfg=TopKConfig(aux_loss_coef=0.01, z_loss_coef=0.001)).route(logits)
    assert routing.expert_ids_TK[:, 0].tolist() == [1, 0, 1, 1]
    # f = [1/4, 3/4], P = [0.375, 0.625]: balance = 2 * (1/4 * 0.375 + 3/4 * 0.625) = 1.125
    torch.testing.assert_close(routing.aux_losses["balance"], torch.tensor(0.01 * 1.125))
    # every row's logsumexp is ln(1 + 3) = ln 4
    torch.testing.assert_close(routing.aux_losses["z"], torch.tensor(0.001 * math.log(4.0) ** 2))


def test_aux_losses_omitted_for_zero_coefficients_and_in_eval():
    logits = torch.randn(16, 4)
    assert set(make("topk", 4, 2, {"z_loss_coef": 0.0}).route(logits).aux_losses) == {"balance"}
    assert set(make("topk", 4, 2, {"aux_loss_coef": 0.0}).route(logits).aux_losses) == {"z"}
    assert make("topk", 4, 2, training=False).route(logits).aux_losses == {}
    assert make("sinkhorn", 4).route(logits).aux_losses == {}
    assert set(make("sinkhorn", 4, cfg={"z_loss_coef": 1e-3}).route(logits).aux_losses) == {"z"}
    assert set(make("expert_choice", 4, cfg={"z_loss_coef": 1e-3}).route(logits).aux_losses) == {"z"}


def routing_prefix(routing, s: int) -> list[torch.Tensor]:
    parts = [routing.expert_ids_TK[:s], routing.weights_TK[:s]]
    return parts + ([] if routing.mask_TK is None else [routing.mask_TK[:s]])


CAUSAL_CASES = [(name, training) for name in ROUTERS for training in (False, True)]


@pytest.mark.parametrize("name,training", [c for c in CAUSAL_CASES if not c[1] or c[0] in ("top1", "topk")])
def test_routing_is_causal(name, training):
    T, E, s = 24, 8, 10
    top_k = 1 if name == "top1" else 2
    router = make(name, E, top_k, training=training)
    logits = torch.randn(T, E)
    perturbed = logits.clone()
    perturbed[s:] = torch.randn(T - s, E) * 10 + torch.linspace(5, 0, E)
    for a, b in zip(routing_prefix(router.route(logits), s), routing_prefix(router.route(perturbed), s)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["expert_choice", "sinkhorn"])
def test_batch_global_routers_are_not_causal_in_training(name):
    T, E, s = 32, 4, 16
    router = make(name, E)
    logits = torch.randn(T, E)
    perturbed = logits.clone()
    perturbed[s:, 0] += 20.0  # later tokens now crowd expert 0, pushing earlier tokens out of it
    before, after = router.route(logits), router.route(perturbed)
    changed = [not torch.equal(a, b) for a, b in zip(routing_prefix(before, s), routing_prefix(after, s))]
    assert any(changed)


def test_unknown_router_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown router 'sinkhorm'") as err:
        build_router("sinkhorm", 8, 1)
    for name in ROUTERS:
        assert name in str(err.value)
    assert "did you mean 'sinkhorn'" in str(err.value)


def test_unknown_cfg_key_names_key_and_valid_keys():
    with pytest.raises(ValueError, match="'n_iter'") as err:
        build_router("sinkhorn", 8, 1, {"n_iter": 3})
    for key in ("temperature", "n_iters", "z_loss_coef"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="SinkhornConfig"):
        build_router("sinkhorn", 8, 1, TopKConfig())


def test_cfg_as_dataclass_or_dict():
    assert build_router("sinkhorn", 8, 1, SinkhornConfig(n_iters=3)).cfg.n_iters == 3
    assert build_router("sinkhorn", 8, 1, {"temperature": 2.0}).cfg.temperature == 2.0
    assert build_router("topk", 8, 2).cfg == TopKConfig()


@pytest.mark.parametrize("name", list(ROUTERS))
def test_top_k_out_of_range_raises(name):
    with pytest.raises(ValueError, match="top_k"):
        make(name, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        make(name, num_experts=4, top_k=0)


def test_top1_rejects_top_k_above_one():
    with pytest.raises(ValueError, match="router=topk"):
        build_router("top1", 8, 2)


def test_bad_router_configs_raise():
    with pytest.raises(ValueError, match="temperature"):
        SinkhornConfig(temperature=0.0)
    with pytest.raises(ValueError, match="n_iters"):
        SinkhornConfig(n_iters=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceConfig(capacity_factor=0.0)
    with pytest.raises(ValueError, match="coef"):
        TopKConfig(aux_loss_coef=-1.0)


def test_register_router_adds_a_rule_buildable_by_name(monkeypatch):
    monkeypatch.setattr("routers.ROUTERS", dict(ROUTERS))  # the registry as it was, after this test
    from dataclasses import dataclass

    import routers

    @dataclass
    class FirstConfig:
        z_loss_coef: float = 0.0

    @routers.register_router("first_expert", FirstConfig)
    class FirstExpert(routers.Router):
        def __init__(self, num_experts, top_k, cfg):
            super().__init__(num_experts, top_k)
            self.cfg = cfg

        def route(self, logits_TE):
            ids_TK = torch.arange(self.top_k).expand(logits_TE.shape[0], self.top_k)
            return routers.Routing(ids_TK, torch.ones(ids_TK.shape), torch.softmax(logits_TE, -1))

    router = routers.build_router("first_expert", 4, 2, {"z_loss_coef": 0.5})
    assert isinstance(router, FirstExpert) and router.cfg.z_loss_coef == 0.5
    assert router.route(torch.randn(3, 4)).expert_ids_TK.tolist() == [[0, 1]] * 3
    routers.register_router("first_expert", FirstConfig)(FirstExpert)  # the same pair again: nothing changes
    with pytest.raises(ValueError, match="already registered by routers.topk.TopKRouter"):
        routers.register_router("topk", FirstConfig)(FirstExpert)
    with pytest.raises(ValueError, match="must be a dataclass"):
        routers.register_router("other", dict)(FirstExpert)
    with pytest.raises(ValueError, match="subclass of routers.base.Router"):
        routers.register_router("other", FirstConfig)(torch.nn.Linear)
    with pytest.raises(ValueError, match="letters, digits"):
        routers.register_router("my router", FirstConfig)(FirstExpert)
