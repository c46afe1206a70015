"""The LM as a whole: exact preset sizes, layer patterns, causality, recurrent == parallel, errors."""
import pytest
import torch

from blocks.accounting import account
from blocks.model import LM, ModelConfig, layer_pattern
from blocks.moe import MoEConfig
from experiments.build import build_model
from experiments.config import compose


def preset(name, *extra):
    with torch.device("meta"):
        return build_model(compose([f"model={name}", *extra]))


@pytest.mark.parametrize(
    "name,total,active",
    [("blackmamba-1.5b", 1_458_462_072, 343_694_712), ("blackmamba-2.8b", 2_783_213_584, 628_770_832)],
)
def test_preset_parameter_counts_are_exact(name, total, active):
    model = preset(name)
    assert sum(p.numel() for p in model.parameters()) == total
    acc = account(model, seq_len=2048)
    assert acc.total_params == total
    assert acc.active_params == active


def test_dense_and_transformer_presets_match_the_reference_sizes():
    # PERF anchors: dense Mamba + MLP 344M, transformer 297M, transformer-MoE 1412M total / 297M active
    # the dense model is the MoE model's active part without the routers (15 x (1152 x 8 + 8))
    assert account(preset("blackmamba-1.5b", "model.mlp=mlp"), 2048).total_params == 343_694_712 - 15 * 9224
    tf = account(preset("blackmamba-1.5b", "mixer=attention", "mixer.n_heads=18", "model.mlp=mlp"), 2048)
    assert round(tf.total_params / 1e6) == 297
    tf_moe = account(preset("blackmamba-1.5b", "mixer=attention", "mixer.n_heads=18"), 2048)
    assert round(tf_moe.total_params / 1e6) == 1412 and round(tf_moe.active_params / 1e6) == 297


def test_flops_accounting_counts_active_experts_only():
    top1 = account(preset("blackmamba-1.5b"), 2048)
    top2 = account(preset("blackmamba-1.5b", "top_k=2"), 2048)
    per_expert_flops = 2 * 3 * 1152 * 3072
    assert top2.fwd_flops_per_token["moe"] - top1.fwd_flops_per_token["moe"] == 15 * per_expert_flops
    assert top1.fwd_flops_per_token["head"] == 2 * 1152 * 50304
    # a training step is 3 forward passes; the matmul part is close to 6 * active params
    assert 0.9 < top1.train_flops_per_token / (6 * top1.active_params) < 1.2


def test_fine_grained_and_shared_expert_presets_are_counted_exactly():
    """blackmamba-1.5b with granularity 4 (32 experts of 768, top-4) and 2 shared experts of 768, by hand:
    per MoE layer the gate grows from 1152 x 8 + 8 = 9,224 to 1152 x 32 + 32 = 36,896 (+27,672), the routed
    experts keep their 84,934,656 parameters (10,616,832 active: 4 x 3 x 1152 x 768, one coarse expert's
    worth) and the shared experts add 3 x 1152 x 1536 = 5,308,416, always active. 15 MoE layers."""
    base = account(preset("blackmamba-1.5b"), 2048)
    fine = account(preset("blackmamba-1.5b", "router=topk", "moe.granularity=4"), 2048)
    shared = account(preset("blackmamba-1.5b", "router=topk", "moe.granularity=4", "moe.num_shared_experts=2"), 2048)
    assert fine.total_params == 1_458_462_072 + 15 * 27_672 == 1_458_877_152
    assert fine.active_params == 343_694_712 + 15 * 27_672 == 344_109_792
    assert shared.total_params == 1_458_877_152 + 15 * 5_308_416 == 1_538_503_392
    assert shared.active_params == 344_109_792 + 15 * 5_308_416 == 423_736_032
    model = preset("blackmamba-1.5b", "router=topk", "moe.granularity=4", "moe.num_shared_experts=2")
    assert sum(p.numel() for p in model.parameters()) == shared.total_params
    # FLOPs: the same routed expert FLOPs (4 x 768 = 3072 wide), a wider gate, the shared GLU
    gate_extra, shared_flops = 2 * 1152 * (32 - 8), 2 * 3 * 1152 * 1536
    torch.testing.assert_close(fine.fwd_flops_per_token["moe"], base.fwd_flops_per_token["moe"] + 15 * gate_extra)
    torch.testing.assert_close(shared.fwd_flops_per_token["moe"], fine.fwd_flops_per_token["moe"] + 15 * shared_flops)


def test_layer_patterns():
    assert layer_pattern(ModelConfig(n_layers=4), "mamba") == ["mamba", "moe", "mamba", "moe"]
    assert layer_pattern(ModelConfig(n_layers=3, mlp="none"), "mamba2") == ["mamba2"] * 3
    hybrid = layer_pattern(ModelConfig(n_layers=8, attn_every=2, moe_every=2), "mamba")
    assert hybrid == ["mamba", "mlp", "attention", "moe", "mamba", "mlp", "attention", "moe"]
    with pytest.raises(ValueError, match="must be even"):
        layer_pattern(ModelConfig(n_layers=5), "mamba")
    with pytest.raises(ValueError, match="Valid choices"):
        layer_pattern(ModelConfig(pattern=["mamba", "lstm"]), "mamba")


def tiny_lm(mixer, router="sinkhorn", top_k=1, pattern=None, **mixer_cfg):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, ffn_dim=48, pattern=pattern)
    moe = MoEConfig(num_experts=4, top_k=top_k, router=router)
    return LM(cfg, mixer, mixer_cfg or None, moe)


ALL_MIXERS = [("mamba", {}), ("mamba2", {"headdim": 16, "d_state": 8, "chunk_size": 4}), ("attention", {"n_heads": 4})]


@pytest.mark.parametrize("mixer,mcfg", ALL_MIXERS)
@pytest.mark.parametrize("router", ["sinkhorn", "topk"])
def test_lm_is_causal_in_training_and_eval(mixer, mcfg, router):
    model = tiny_lm(mixer, router, top_k=2 if router == "topk" else 1, **mcfg)
    idx = torch.randint(0, 64, (2, 12))
    s = 5
    idx2 = idx.clone()
    idx2[:, s + 1 :] = torch.randint(0, 64, (2, 6))
    for train_mode in ([False, True] if router == "topk" else [False]):
        model.train(train_mode)
        a, _ = model(idx)
        b, _ = model(idx2)
        # Changing later tokens changes how many tokens each expert gets, and CPU BLAS may round a row
        # differently in a matmul of another height (1e-8 here); a real leak of the future moves the
        # outputs by orders of magnitude more.
        torch.testing.assert_close(a[:, : s + 1], b[:, : s + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, s + 1 :], b[:, s + 1 :], atol=1e-3)  # the change did reach later outputs


@pytest.mark.parametrize("mixer,mcfg", ALL_MIXERS)
def test_lm_recurrent_decoding_equals_parallel_forward(mixer, mcfg):
    model = tiny_lm(mixer, **mcfg).eval()
    idx = torch.randint(0, 64, (2, 10))
    full, _ = model(idx)
    cache = model.allocate_cache(2, 10)
    prefix, _ = model(idx[:, :4], cache)
    steps = [model.step(idx[:, t], cache) for t in range(4, 10)]
    got = torch.cat([prefix, torch.stack(steps, 1)], 1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_hybrid_lm_decodes_recurrently():
    model = tiny_lm("mamba", pattern=["mamba", "moe", "attention", "mlp"]).eval()
    idx = torch.randint(0, 64, (1, 8))
    full, _ = model(idx)
    cache = model.allocate_cache(1, 8)
    steps = torch.stack([model.step(idx[:, t], cache) for t in range(8)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_aux_losses_reach_the_lm_in_training():
    model = tiny_lm("mamba", "topk", top_k=2).train()
    _, aux = model(torch.randint(0, 64, (2, 8)))
    assert set(aux) >= {"balance", "z"} and all(torch.isfinite(v) for v in aux.values())


@pytest.mark.parametrize(
    "argv,match",
    [
        (["mixer=lstm"], "mamba2"),
        (["router=top3"], "expert_choice"),
        (["experts=4", "top_k=5"], "top_k"),
        (["experts=0"], "experts"),
        (["mixer=attention", "mixer.n_heads=5"], "divisible"),
    ],
)
def test_impossible_configs_fail_with_a_clear_message(argv, match):
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            build_model(compose(["model=tiny", "model.vocab_size=256", *argv]))
