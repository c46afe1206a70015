"""On a GPU: the MoE layer's kernel path against its PyTorch path, as training runs it.

    python3 benchmarks/check_gpu_moe.py

0. The fused routing kernels against their PyTorch twins (ids may differ only on near-ties), the top-k gate
   with and without a selection bias (aux-loss-free balancing).
1. One MoE layer per router, fp32 weights and fp32 input under bf16 autocast (as inside the LM): output and
   every gradient from the Triton kernels and from the PyTorch reference, each against the reference run in
   fp32 without autocast (the routing is computed in fp32 in all three, so it is the same). The kernels pass
   when their error is no larger than the bf16 reference's own error (x1.5 + 1e-3).
2. A small BlackMamba-style LM (attention mixer, MoE MLPs) takes 30 training steps on the kernel path:
   loss finite and falling.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blocks.moe as moe_module  # noqa: E402
from blocks.model import LM, ModelConfig  # noqa: E402
from blocks.moe import MoE, MoEConfig  # noqa: E402


def run_layer(moe: MoE, x: torch.Tensor, g: torch.Tensor, kernels: bool, autocast: bool) -> list[torch.Tensor]:
    moe_module.use_triton = (lambda *t: all(v.is_cuda for v in t)) if kernels else (lambda *t: False)
    x = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, _ = moe(x)
    params = [moe.w_in, moe.w_out, moe.gate.weight, moe.gate.bias]
    return [y.float(), *(t.float() for t in torch.autograd.grad(y, [x, *params], g.to(y.dtype)))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_routing() -> bool:
    """Fused top-k gate and Sinkhorn against their PyTorch twins on GPU tensors (T 16384)."""
    from routers.kernels import sinkhorn_topk, sinkhorn_topk_ref, topk_gate, topk_gate_ref
    ok = True
    for E, k in ((8, 1), (64, 8)):
        logits = torch.randn(16384, E, device="cuda") * 2
        got, ref = topk_gate(logits, k), topk_gate_ref(logits, k)
        same_ids = (got.expert_ids_TK == ref.expert_ids_TK).float().mean().item()
        w_err, p_err = rel(got.weights_TK, ref.weights_TK), rel(got.probs_TE, ref.probs_TE)
        sk_same = (sinkhorn_topk(logits, k) == sinkhorn_topk_ref(logits, k)).float().mean().item()
        bias = torch.randn(E, device="cuda") * 0.05
        got_b, ref_b = topk_gate(logits, k, bias_E=bias), topk_gate_ref(logits, k, bias_E=bias)
        bias_same = (got_b.expert_ids_TK == ref_b.expert_ids_TK).float().mean().item()
        bias_w_err = rel(got_b.weights_TK, ref_b.weights_TK)
        good = (same_ids > 0.999 and w_err < 1e-5 and p_err < 1e-5 and sk_same > 0.999 and bias_same > 0.999
                and bias_w_err < 1e-5)
        ok &= good
        print(f"routing E {E} k {k}: top-k ids equal {same_ids:.5f}, weights rel err {w_err:.1e}, probs {p_err:.1e}; "
              f"with a bias: ids equal {bias_same:.5f}, weights {bias_w_err:.1e}; Sinkhorn ids equal {sk_same:.5f} "
              f"{'OK' if good else 'FAIL'}", flush=True)
    return ok


def main() -> None:
    torch.manual_seed(0)
    ok = check_routing()
    names = ("y", "dx", "dw_in", "dw_out", "dgate_w", "dgate_b")
    aux_free = {"gate": "sigmoid", "aux_loss_coef": 0.0, "bias_update_rate": 0.01}
    for router, k, router_cfg in (("sinkhorn", 1, None), ("top1", 1, None), ("topk", 2, None),
                                  ("expert_choice", 1, None), ("topk", 1, aux_free)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            moe = MoE(512, MoEConfig(num_experts=8, top_k=k, router=router, router_cfg=router_cfg), 1024).cuda().train()
        if router_cfg is not None:  # a bias that changes the choices
            moe.router.load.bias_steps.copy_(torch.tensor([3, -2, 0, 1, -1, 2, 0, -3]))
            router = "aux_free"
        x = torch.randn(4, 512, 512, device="cuda")
        g = torch.randn_like(x)
        truth = run_layer(moe, x, g, kernels=False, autocast=False)
        ours = run_layer(moe, x, g, kernels=True, autocast=True)
        ref = run_layer(moe, x, g, kernels=False, autocast=True)
        errs = [(n, rel(a, t), rel(b, t)) for n, a, b, t in zip(names, ours, ref, truth)]
        good = all(e_ours <= 1.5 * e_ref + 1e-3 for _, e_ours, e_ref in errs)
        ok &= good
        print(f"{router:13s} k={k} rel err vs fp32 (kernels / bf16 reference): "
              + ", ".join(f"{n} {a:.1e}/{b:.1e}" for n, a, b in errs) + ("  OK" if good else "  FAIL"), flush=True)

    moe_module.use_triton = lambda *t: all(v.is_cuda for v in t)
    model = LM(ModelConfig(vocab_size=256, d_model=256, n_layers=4, ffn_dim=512), mixer="attention",
               moe_cfg=MoEConfig(num_experts=8, top_k=1, router="sinkhorn")).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (8, 257), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, aux = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        (loss + sum(aux.values())).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    falling = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    ok &= falling
    print(f"LM (attention + Sinkhorn MoE), 30 steps on the kernel path: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"{'OK' if falling else 'FAIL'}")
    print("ALL OK" if ok else "SOME CHECK FAILED")


if __name__ == "__main__":
    main()
