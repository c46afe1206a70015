"""The fused decoding step (blocks/kernels/decode.py, blocks/fused_step.py) against its PyTorch twins, on the CPU
through Triton's interpreter: fp32, fresh random inputs, sizes that are not multiples of the blocks, batch 1
(the row-sum path) and batches over 16 (the tl.dot path); then the whole LM.step against the modules' steps."""
from __future__ import annotations

import copy

import pytest
import torch

from blocks.attention import AttentionConfig
from blocks.kernels import force_triton
from blocks.kernels.decode import (
    dt_proj_ssm_step,
    dt_proj_ssm_step_ref,
    expert_down_residual_,
    expert_down_residual_ref_,
    expert_glu_up,
    expert_glu_up_ref,
    gated_glu,
    gated_glu_ref,
    linear_residual_,
    norm_gate,
    norm_gate_ref,
    norm_in_proj_conv,
    norm_in_proj_conv_ref,
    route_glu_up,
    route_glu_up_ref,
    x_proj_split_k,
)
from blocks.kernels.ssm_step import selective_state_step_triton
from blocks.mamba import Mamba, MambaConfig
from blocks.model import LM, ModelConfig
from blocks.moe import MoE, MoEConfig
from blocks.scan import selective_state_step

TOL = dict(rtol=1e-5, atol=1e-5)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_norm_in_proj_conv_matches_ref(rows, conv_bias):
    D, E, K = 24, 10, 4  # 2E = 20 outputs in blocks of 16, D = 24 inputs in blocks of 16
    res, norm_w, w_in = randn(rows, D, seed=1) * 3, randn(D, seed=2), randn(2 * E, D, seed=3) / 5
    state = randn(rows, E, K, seed=4)
    conv_w, conv_b = randn(E, K, seed=5), randn(E, seed=6) if conv_bias else None
    state_ref = state.clone()
    x_ref, z_ref = norm_in_proj_conv_ref(res, norm_w, 1e-5, w_in, state_ref, conv_w, conv_b)
    x, z = norm_in_proj_conv(res, norm_w, 1e-5, w_in, state, conv_w, conv_b)
    torch.testing.assert_close(x, x_ref, **TOL)
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)


@pytest.mark.parametrize("rows", [1, 20])
def test_linear_residual_matches_ref(rows):
    res, x, w = randn(rows, 20, seed=7), randn(rows, 40, seed=8), randn(20, 40, seed=9)
    expected = res + x @ w.T
    out = linear_residual_(res, x, w)
    assert out is res
    torch.testing.assert_close(res, expected, **TOL)


@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("experts", [5, 8])
def test_norm_gate_matches_ref(rows, experts):
    res, norm_w = randn(rows, 24, seed=10) * 2, randn(24, seed=11)
    gate_w, gate_b = randn(experts, 24, seed=12), randn(experts, seed=13)
    h_ref, logits_ref = norm_gate_ref(res, norm_w, 1e-5, gate_w, gate_b)
    h, logits = norm_gate(res, norm_w, 1e-5, gate_w, gate_b)
    torch.testing.assert_close(h, h_ref, **TOL)
    torch.testing.assert_close(logits, logits_ref, **TOL)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_norm_gate_top1_matches_ref(gate):
    res, norm_w = randn(3, 24, seed=30), randn(24, seed=31)
    gate_w, gate_b = randn(5, 24, seed=32), randn(5, seed=33)
    expected = norm_gate_ref(res, norm_w, 1e-5, gate_w, gate_b, gate)
    got = norm_gate(res, norm_w, 1e-5, gate_w, gate_b, gate)
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_routers_declare_their_eval_gate():
    from routers import build_router

    assert build_router("sinkhorn", 4, 1).eval_gate() == "sigmoid"
    assert build_router("top1", 4, 1).eval_gate() == "softmax"
    assert build_router("top1", 4, 1, {"gate": "sigmoid"}).eval_gate() == "sigmoid"
    assert build_router("expert_choice", 4, 1).eval_gate() == "softmax"
    aux_free = build_router("topk", 4, 1, AUX_FREE)
    assert aux_free.eval_gate() is None  # a selection bias picks the experts


@pytest.mark.parametrize("tokens,k", [(1, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_expert_projections_match_ref(tokens, k, activation):
    E, D, F = 4, 24, 20
    h, w_in, w_out = randn(tokens, D, seed=14), randn(E, D, 2 * F, seed=15) / 4, randn(E, F, D, seed=16) / 4
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(17 + t))[:k] for t in range(tokens)])
    weights = torch.rand(tokens, k, generator=torch.Generator().manual_seed(18))
    a_ref = expert_glu_up_ref(h, ids, w_in, activation)
    a = expert_glu_up(h, ids, w_in, activation)
    torch.testing.assert_close(a, a_ref, **TOL)
    res = randn(tokens, D, seed=19)
    expected = expert_down_residual_ref_(res.clone(), a_ref, ids, weights, w_out)
    torch.testing.assert_close(expert_down_residual_(res, a, ids, weights, w_out), expected, **TOL)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_route_glu_up_matches_norm_gate_then_expert_up(gate, activation):
    # D 40 is split over two programs by the interpreter's tiles, F 20 over two output blocks; every program
    # routes for itself, so a wrong expert in any block shows in `a`
    E, D, F = 5, 40, 20
    res, norm_w = randn(1, D, seed=40) * 2, randn(D, seed=41)
    gate_w, gate_b = randn(E, D, seed=42), randn(E, seed=43)
    w_in = randn(E, D, 2 * F, seed=44) / 4
    for seed in range(3):  # fresh rows: different experts chosen
        res = randn(1, D, seed=45 + seed) * 2
        a, ids, weights = route_glu_up(res, norm_w, 1e-5, gate_w, gate_b, gate, w_in, activation)
        a_ref, ids_ref, weights_ref = route_glu_up_ref(res, norm_w, 1e-5, gate_w, gate_b, gate, w_in, activation)
        assert ids.tolist() == ids_ref.tolist()
        torch.testing.assert_close(weights, weights_ref, **TOL)
        torch.testing.assert_close(a, a_ref, **TOL)
    with pytest.raises(ValueError, match="one contiguous token"):
        route_glu_up(randn(2, D, seed=0), norm_w, 1e-5, gate_w, gate_b, gate, w_in, activation)


def test_split_reductions_leave_their_counters_at_zero():
    # the interpreter splits each reduction in two; a counter left non-zero would make the next launch's
    # programs miscount who arrived last, so a second launch on the same inputs must give the same result
    from blocks.kernels import decode

    E, D, F = 4, 40, 20
    h, w_in, w_out = randn(1, D, seed=50), randn(E, D, 2 * F, seed=51) / 4, randn(E, F, D, seed=52) / 4
    ids, weights = torch.tensor([[3]]), torch.tensor([[0.7]])
    res = randn(1, D, seed=53)
    runs = []
    for _ in range(2):
        a = expert_glu_up(h, ids, w_in, "swiglu")
        runs.append((a, expert_down_residual_(res.clone(), a, ids, weights, w_out),
                     linear_residual_(res.clone(), randn(1, 2 * D, seed=54), randn(D, 2 * D, seed=55))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    counters = [c for (_, _, name), c in decode._COUNTERS.items() if name in ("expert_up", "expert_down", "out_proj")]
    assert len(counters) == 3 and all(int(c.abs().sum()) == 0 for c in counters)


@pytest.mark.parametrize("tokens,k", [(5, 1), (6, 2)])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_glu_matches_ref(tokens, k, activation):
    # every expert's GLU output of every token, scaled by the gate weight of the slot that chose it (0 if none);
    # F 20 is not a multiple of the interpreter's block of 16
    E, F = 4, 20
    up = randn(E, tokens, 2 * F, seed=30)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(31 + t))[:k] for t in range(tokens)])
    weights = torch.rand(tokens, k, generator=torch.Generator().manual_seed(32))
    a = gated_glu(up, ids, weights, activation)
    torch.testing.assert_close(a, gated_glu_ref(up, ids, weights, activation), **TOL)
    unchosen = torch.ones(tokens, E, dtype=torch.bool).scatter_(1, ids, False)
    assert (a.view(tokens, E, F)[unchosen] == 0).all()


def test_state_step_with_log_A_matches_ref():
    Bsz, Dim, N = 2, 5, 3
    x, z, dt = randn(Bsz, Dim, seed=20), randn(Bsz, Dim, seed=21), randn(Bsz, Dim, seed=22)
    A_log = randn(Dim, N, seed=24) / 2
    B, C, D, bias = randn(Bsz, N, seed=25), randn(Bsz, N, seed=26), randn(Dim, seed=27), randn(Dim, seed=28)
    state = randn(Bsz, Dim, N, seed=29)
    state_ref = state.clone()
    y_ref = selective_state_step(state_ref, x, dt, -torch.exp(A_log), B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    y = selective_state_step_triton(state, x, dt, A_log, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True, A_is_log=True)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)


@pytest.mark.parametrize("rows", [1, 2])
def test_x_proj_split_k_sums_to_the_projection(rows):
    x, w = randn(rows, 37, seed=30), randn(11, 37, seed=31)  # 37 inputs: three slices of 16, the last partial
    parts = x_proj_split_k(x, w)
    assert parts.shape == (3, rows, 11) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(0), x @ w.T, **TOL)
    torch.testing.assert_close(parts[0], x[:, :16] @ w[:, :16].T, **TOL)  # slice s: inputs 16 s .. 16 s + 15


@pytest.mark.parametrize("with_z", [True, False])
def test_dt_proj_ssm_step_matches_ref(with_z):
    Bsz, Dim, N, R, S = 2, 9, 3, 5, 3  # 9 channels in blocks of 4
    parts = randn(S, Bsz, R + 2 * N, seed=40) / 2
    dt_w, bias, A_log = randn(Dim, R, seed=41) / 2, randn(Dim, seed=42), randn(Dim, N, seed=43) / 2
    D, x = randn(Dim, seed=44), randn(Bsz, Dim, seed=45)
    z = randn(Bsz, Dim, seed=46) if with_z else None
    state = randn(Bsz, Dim, N, seed=47)
    state_ref = state.clone()
    y_ref = dt_proj_ssm_step_ref(parts, dt_w, bias, A_log, D, state_ref, x, z)
    y = dt_proj_ssm_step(parts, dt_w, bias, A_log, D, state, x, z)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)


def test_pdl_is_never_used_off_the_gpu():
    from blocks.kernels.decode import _launch, _pdl

    assert not _pdl(torch.zeros(1))  # a CPU tensor (and the interpreter): plain launches
    assert _launch({"num_warps": 4, "BLOCK_K": 8}, pdl=True) == {"num_warps": 4, "launch_pdl": True}
    assert _launch({"num_warps": 4}) == {"num_warps": 4}


def test_prefetch_is_never_used_off_the_gpu():
    from blocks.kernels.decode import _pf_args

    w = torch.zeros(4, 8)
    assert _pf_args(w, w, {"num_warps": 4})["PF"] is False  # a CPU tensor (and the interpreter): no prefetch
    assert _pf_args(None, w, {})["PF"] is False


PTX_OF_EXPERT_DOWN = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blocks.kernels import decode

kernel = decode._expert_down_kernel
ptr_types = {"ids_ptr": "*i64", "cnt_ptr": "*i32", "g_ptr": "*fp32", "res_ptr": "*fp32", "part_ptr": "*fp32"}
values = dict(F=256, PDL=False, PF=sys.argv[1] == "on", PF_STEP=64, PF_BLOCK=128, BLOCK_N=64, BLOCK_F=64,
              CHUNK=128, SPLIT=2)
signature = {n: "constexpr" if n in values else ptr_types.get(n, "*bf16") if n.endswith("_ptr") else "i32"
             for n in kernel.arg_names}
constexprs = {(i,): values[n] for i, n in enumerate(kernel.arg_names) if n in values}
src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


@pytest.mark.parametrize("pf", ["on", "off"])
def test_prefetch_survives_into_the_compiled_kernel(pf):
    """The L2 prefetch has no result that anything reads: compiled for sm90 (on the CPU, no GPU needed; in a
    child process, as this one runs Triton's interpreter), the expert down kernel must still hold the prefetch
    instruction with PF on, and none with PF off."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", PTX_OF_EXPERT_DOWN, pf], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("prefetch.global.L2" in out.stdout) == (pf == "on")


AUX_FREE = {"gate": "sigmoid", "aux_loss_coef": 0.0, "bias_update_rate": 1e-3}


def tiny_lm(router: str, top_k: int = 1, pattern=None, shared: int = 0) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=4, ffn_dim=20, pattern=pattern, final_norm="rmsnorm")
    router_cfg = AUX_FREE if router == "topk" and top_k == 1 else None
    moe = MoEConfig(num_experts=4, top_k=top_k, router=router, shared_ffn_dim=shared, router_cfg=router_cfg)
    model = LM(cfg, "mamba", MambaConfig(d_state=3), moe, attention_cfg=AttentionConfig(n_heads=4)).eval()
    with torch.no_grad():  # non-trivial values everywhere the kernels read
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():  # a selection bias (rate x steps) large enough to change choices
            if getattr(m, "load", None) is not None:
                m.load.bias_steps.copy_(torch.randint(-300, 300, m.load.bias_steps.shape))
    return model


@pytest.mark.parametrize(
    "router,top_k,batch,pattern,shared",
    [
        ("sinkhorn", 1, 1, None, 0),  # route_glu_up (norm, routing, expert up) and the routed expert down
        ("topk", 2, 1, None, 0),  # two slots per token, summed in slot order
        ("sinkhorn", 1, 5, None, 0),  # more slots than experts: every expert on the normed input
        ("topk", 2, 3, None, 0),  # the same with two slots a token
        ("expert_choice", 1, 5, None, 0),
        ("topk", 1, 5, None, 8),  # aux-free bias and a shared expert, every expert on every token
        ("expert_choice", 1, 2, None, 0),
        ("top1", 1, 1, ["mamba", "moe", "attention", "mlp"], 0),  # attention and a dense MLP take their own steps
        ("top1", 1, 1, None, 8),  # a shared expert
        ("topk", 1, 1, None, 0),  # aux-free balancing: the router's own rule (its bias), not the kernel's
    ],
)
def test_fused_lm_step_matches_module_steps(router, top_k, batch, pattern, shared):
    model = tiny_lm(router, top_k, pattern, shared)
    prompt = torch.randint(0, 50, (batch, 5), generator=torch.Generator().manual_seed(1))
    cache = model.allocate_cache(batch, 12)
    with torch.no_grad():
        model(prompt, cache)  # prefill on the reference path, then both paths step from the same state
    cache_fused = copy.deepcopy(cache)
    tokens = torch.randint(0, 50, (batch, 4), generator=torch.Generator().manual_seed(2))
    for t in range(tokens.shape[1]):
        expected = model.step(tokens[:, t], cache)
        with force_triton():
            got = model.step(tokens[:, t], cache_fused)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for c_ref, c in zip(cache, cache_fused):
        if c is not None and hasattr(c, "ssm_state"):
            torch.testing.assert_close(c.ssm_state, c_ref.ssm_state, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c.conv_state, c_ref.conv_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", [None, ["mamba", "moe", "attention", "moe"]])
def test_batch1_kernels_are_handed_the_weights_to_prefetch(monkeypatch, pattern):
    """Which weights each batch-1 kernel pulls into L2: norm + in_proj its block's out_proj, the routed expert's
    up kernel that MoE's w_out, the expert down kernel the next block's in_proj when that block is a fused
    Mamba block (nothing before attention or the head)."""
    import blocks.fused_step as fs

    seen = {"in": [], "up": [], "down": []}

    def spy(name, fn, key):
        def wrapped(*args, **kwargs):
            seen[name].append(kwargs.get(key))
            return fn(*args, **kwargs)
        monkeypatch.setattr(fs, fn.__name__, wrapped)

    spy("in", fs.norm_in_proj_conv, "prefetch")
    spy("up", fs.route_glu_up, "w_out")
    spy("down", fs.expert_down_residual_, "prefetch")
    model = tiny_lm("sinkhorn", 1, pattern)
    cache = model.allocate_cache(1, 4)
    with torch.no_grad(), force_triton():
        model.step(torch.tensor([3]), cache)
    layers = list(model.layers)
    mambas = [b for b in layers if isinstance(getattr(b, "mixer", None), Mamba)]
    moes = [b for b in layers if isinstance(getattr(b, "mlp", None), MoE)]
    assert len(seen["in"]) == len(mambas) > 0 and len(seen["up"]) == len(moes) > 0
    assert all(w is m.mixer.out_proj.weight for w, m in zip(seen["in"], mambas))
    assert all(w is m.mlp.w_out for w, m in zip(seen["up"], moes))
    expected_down = []
    for i, b in enumerate(layers):
        if b in moes:
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            expected_down.append(None if nxt is None or nxt not in mambas else nxt.mixer.in_proj.weight)
    assert len(seen["down"]) == len(expected_down) > 0
    assert all((w is None and e is None) or w is e for w, e in zip(seen["down"], expected_down))


def test_fused_step_takes_the_norms_eps_as_the_module_does():
    from torch import nn

    from blocks.kernels.add_norm import rms_eps  # what the fused step and LM.forward's kernel path use

    assert rms_eps(nn.RMSNorm(4, eps=1e-5).bfloat16()) == 1e-5
    # eps=None: the eps of the input's dtype, and the blocks cast their input to the weights' dtype
    assert rms_eps(nn.RMSNorm(4, eps=None).bfloat16()) == torch.finfo(torch.bfloat16).eps
