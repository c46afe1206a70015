"""On a GPU: the MoE layer's kernel path against its PyTorch path, as training runs it.

    python3 benchmarks/check_gpu_moe.py

0. The fused routing kernels against their PyTorch twins (ids may differ only on near-ties).
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
        good = same_ids > 0.999 and w_err < 1e-5 and p_err < 1e-5 and sk_same > 0.999
        ok &= good
        print(f"routing E {E} k {k}: top-k ids equal {same_ids:.5f}, weights rel err {w_err:.1e}, probs {p_err:.1e}; "
              f"Sinkhorn ids equal {sk_same:.5f} {'OK' if good else 'FAIL'}", flush=True)
    return ok


def main() -> None:
    torch.manual_seed(0)
    ok = check_routing()
    names = ("y", "dx", "dw_in", "dw_out", "dgate_w", "dgate_b")
    for router, k in (("sinkhorn", 1), ("top1", 1), ("topk", 2), ("expert_choice", 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            moe = MoE(512, MoEConfig(num_experts=8, top_k=k, router=router), 1024).cuda().train()
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
