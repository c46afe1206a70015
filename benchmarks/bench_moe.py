"""MoE layer on one GPU: correctness first, then fwd+bwd time side by side (bf16).

    python benchmarks/bench_moe.py [--quick] [--shapes 1.5b,2.8b,fine]

For each shape and routing (uniform, skewed) it times, including routing from the logits:
  dense    a dense GLU MLP with the same active FLOPs (hidden width K*F), the ceiling to approach
  loop     a Python loop over experts (nonzero + index per expert)
  gmm      argsort + gather + torch._grouped_mm + scatter (the usual recipe)
  ours     the platform's MoE path on CUDA (fused routing, permutation, Triton grouped GEMMs)
then the routing step alone (top-k and Sinkhorn, fused vs PyTorch), and per-kernel times of ours.
Prints a table last; writes bench_moe.json (and the log) under $OUT when it is set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.kernels.grouped_gemm import gmm, gmm_glu, gmm_wgrad  # noqa: E402
from blocks.kernels.glu import glu_bwd  # noqa: E402
from blocks.kernels.moe import moe_experts_triton  # noqa: E402
from blocks.kernels.permute import permute_slots  # noqa: E402
from blocks.moe import moe_experts_ref  # noqa: E402

SHAPES = {  # name: (T, D, F, E, K)
    "1.5b": (16384, 1152, 3072, 8, 1),
    "2.8b": (16384, 1472, 3872, 8, 1),
    "fine": (16384, 2048, 1024, 64, 8),
}
DEV, BF16 = "cuda", torch.bfloat16
ROWS: list[dict] = []


def bench(fn, rep: int = 200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn) -> float:
    """GPU time of a short op without the launch overhead that dominates it when timed alone:
    replayed from a CUDA graph (falls back to plain timing if the op cannot be captured)."""
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        return bench(fn, rep=100)


def log(msg: str) -> None:
    print(msg, flush=True)


class Gate:
    """Router logits x @ W_g + b (fp32): W_g random, b = 0 (about uniform load) or 2 log p_e with
    p_e ~ (e+1)^-1.5 (skewed load: a few experts take most tokens)."""

    def __init__(self, D: int, E: int, skewed: bool, gen: torch.Generator):
        self.w = torch.randn(D, E, device=DEV, generator=gen) / math.sqrt(D)
        self.b = torch.zeros(E, device=DEV)
        if skewed:
            p = torch.arange(1, E + 1, device=DEV, dtype=torch.float32) ** -1.5
            self.b = 2.0 * torch.log(p / p.sum())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x.float(), self.w)


def topk_torch(logits_TE: torch.Tensor, k: int):
    probs = torch.softmax(logits_TE.float(), -1)
    w, ids = torch.topk(probs, k, dim=-1)
    if k > 1:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


def fused_topk():
    try:
        from routers.kernels import topk_gate
    except ImportError:
        return None
    return topk_gate


def route_ours(logits_TE: torch.Tensor, k: int):
    topk_gate = fused_topk()
    if topk_gate is None:
        return topk_torch(logits_TE, k)
    gate = topk_gate(logits_TE, k)
    return gate.weights_TK, gate.expert_ids_TK


def glu(h):
    a, b = h.chunk(2, -1)
    return F.silu(a) * b


def make_variants(x, wg, w1, w2, K):
    E, D, F2 = w1.shape
    T = x.shape[0]
    w1d = w1[0].detach().repeat(1, K).clone().requires_grad_() if K > 1 else w1[0].detach().clone().requires_grad_()
    w2d = w2[0].detach().repeat(K, 1).clone().requires_grad_() if K > 1 else w2[0].detach().clone().requires_grad_()
    if K > 1:  # a dense GLU of hidden width K*F: keep gate halves first
        Fh = F2 // 2
        w1d = torch.cat([w1[0, :, :Fh].repeat(1, K), w1[0, :, Fh:].repeat(1, K)], 1).detach().clone().requires_grad_()

    def dense():
        return glu(x @ w1d) @ w2d

    def loop():
        w, ids = topk_torch(wg(x), K)
        out = torch.zeros(T, D, device=DEV, dtype=torch.float32)
        flat_ids, flat_w = ids.reshape(-1), w.reshape(-1)
        for e in range(E):
            slot = (flat_ids == e).nonzero().squeeze(1)
            tok = slot // K
            y = glu(x[tok] @ w1[e]) @ w2[e]
            out = out.index_add(0, tok, y.float() * flat_w[slot, None])
        return out.to(x.dtype)

    def grouped():
        w, ids = topk_torch(wg(x), K)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        tok = order // K
        h = torch._grouped_mm(x[tok], w1, offs=offs)
        y = torch._grouped_mm(glu(h), w2, offs=offs)
        y = y.float() * w.reshape(-1)[order, None]
        return torch.zeros(T, D, device=DEV, dtype=torch.float32).index_add(0, tok, y).to(x.dtype)

    def ours():
        w, ids = route_ours(wg(x), K)
        return moe_experts_triton(x, ids, w, None, w1, w2, "swiglu")

    return {"dense": dense, "loop": loop, "gmm": grouped, "ours": ours}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(shape_name, x, wg, w1, w2, K):
    """ours in bf16 against the PyTorch reference in fp32 on the same routing: output and all gradients."""
    w, ids = topk_torch(wg(x), K)
    w = w.detach().requires_grad_()
    g = torch.randn(x.shape, device=DEV, dtype=BF16)
    y = moe_experts_triton(x, ids, w, None, w1, w2, "swiglu")
    got = [y, *torch.autograd.grad(y, [x, w, w1, w2], g)]
    xs, ws, w1s, w2s = (t.detach().float().requires_grad_() for t in (x, w, w1, w2))
    yr = moe_experts_ref(xs, ids, ws, None, w1s, w2s, "swiglu", grouped_mm=False)
    ref = [yr, *torch.autograd.grad(yr, [xs, ws, w1s, w2s], g.float())]
    errs = {n: rel(a, b) for n, a, b in zip(("y", "dx", "dw", "dw1", "dw2"), got, ref)}
    ok = all(e < 2e-2 for e in errs.values()) and all(math.isfinite(e) for e in errs.values())
    log(f"  check {shape_name}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()) + ("  OK" if ok else "  FAIL"))
    return ok, errs


def run_shape(name, routing, quick):
    T, D, F_, E, K = SHAPES[name]
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(T, D, device=DEV, dtype=BF16, generator=gen).requires_grad_()
    w1 = (torch.randn(E, D, 2 * F_, device=DEV, dtype=BF16, generator=gen) / math.sqrt(D)).requires_grad_()
    w2 = (torch.randn(E, F_, D, device=DEV, dtype=BF16, generator=gen) / math.sqrt(F_)).requires_grad_()
    wg = Gate(D, E, routing == "skewed", gen)
    _, ids = topk_torch(wg(x), K)
    load = torch.bincount(ids.reshape(-1), minlength=E).float()
    log(f"{name} {routing}: T {T} D {D} F {F_} E {E} top-{K}; max/mean load {(load.max() / load.mean()).item():.2f}, "
        f"empty experts {(load == 0).sum().item()}")
    ok, errs = check(name, x, wg, w1, w2, K)
    flops = 3 * (2 * T * K * D * 2 * F_ + 2 * T * K * F_ * D)
    times = {}
    for vname, fn in make_variants(x, wg, w1, w2, K).items():
        if vname == "loop" and quick:
            continue
        try:
            y = fn()
            g = torch.randn_like(y)
            times[vname] = bench(lambda: fn().backward(g))
        except Exception as exc:  # keep the other variants' numbers
            log(f"  {vname} failed: {type(exc).__name__}: {str(exc)[:200]}")
    for vname, ms in times.items():
        ratio = times["dense"] / ms if "dense" in times else float("nan")
        ROWS.append(dict(shape=name, routing=routing, variant=vname, ms=ms, tflops=flops / ms / 1e9,
                         vs_dense=ratio, check_ok=ok, errs=errs))
        log(f"  {vname:6s} fwd+bwd {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  {ratio:5.2f} of dense")
    if name == "1.5b" and routing == "uniform":
        breakdown(x, wg, w1, w2, K)


def breakdown(x, wg, w1, w2, K):
    """Per-kernel times of ours at this shape, against torch._grouped_mm and a dense mm of the same size."""
    T, D = x.shape
    E, _, F2 = w1.shape
    w, ids = topk_torch(wg(x), K)
    order, offs = permute_slots(ids, E)
    tok = order // K
    P = T * K
    h, act = gmm_glu(x, w1, offs, P, "swiglu", a_rows=tok)
    dout = torch.randn(T, D, device=DEV, dtype=BF16)
    offs_end = offs[1:].contiguous()
    xs = x.detach()[tok]
    parts = {
        "route topk (torch)": lambda: topk_torch(wg(x), K),
        "permute": lambda: permute_slots(ids, E),
        "argsort (torch)": lambda: torch.argsort(ids.reshape(-1), stable=True),
        "gmm1 gather (ours)": lambda: gmm(x, w1, offs, P, a_rows=tok),
        "gmm1 _grouped_mm": lambda: torch._grouped_mm(xs, w1.detach(), offs=offs_end),
        "gmm1 dense mm": lambda: xs @ w1.detach()[0],
        "gmm1+glu (ours)": lambda: gmm_glu(x, w1, offs, P, "swiglu", a_rows=tok),
        "gmm2 scatter (ours)": lambda: gmm(act, w2, offs, P, out=torch.empty(T, D, device=DEV, dtype=BF16), y_rows=order, scale=w.reshape(-1)[order]),
        "gmm2 _grouped_mm": lambda: torch._grouped_mm(act, w2.detach(), offs=offs_end),
        "dgrad2 (ours)": lambda: gmm(dout, w2.transpose(1, 2), offs, P, a_rows=tok),
        "glu bwd (ours)": lambda: glu_bwd(h, act, w.reshape(-1)[order], order, torch.zeros(P, device=DEV), offs, "swiglu", dout, tok),
        "dgrad1 scatter (ours)": lambda: gmm(h, w1.transpose(1, 2), offs, P, out=torch.empty(T, D, device=DEV, dtype=BF16), y_rows=order),
        "wgrad1 (ours)": lambda: gmm_wgrad(x, h, offs, a_rows=tok, compute_dtype=BF16),
        "wgrad1 dense mm": lambda: xs.T @ h,
        "wgrad2 (ours)": lambda: gmm_wgrad(act, xs, offs, compute_dtype=BF16),
        "wgrad2 dense mm": lambda: act.T @ xs,
    }
    log("  breakdown at 1.5b uniform:")
    for pname, fn in parts.items():
        try:
            ms = bench_graph(fn)
            ROWS.append(dict(shape="1.5b", routing="uniform", variant="part:" + pname, ms=ms))
            log(f"    {pname:22s} {ms * 1e3:8.1f} us")
        except Exception as exc:
            log(f"    {pname} failed: {type(exc).__name__}: {str(exc)[:200]}")
    kernels_report()


def kernels_report():
    """Chosen tile configs, and whether each compiled kernel issues Hopper wgmma instructions."""
    from blocks.kernels import grouped_gemm
    for kname in ("_gmm_kernel", "_wgrad_kernel"):
        kern = getattr(grouped_gemm, kname)
        for key, cfg in kern.cache.items():
            log(f"    {kname} key {key[:6]} -> {cfg}")
        try:
            for dev_cache in kern.fn.device_caches.values():
                for compiled in dev_cache[0].values():
                    ptx = compiled.asm.get("ptx", "")
                    log(f"    {kname} {compiled.metadata.num_warps} warps: wgmma {'wgmma' in ptx}, "
                        f"mma.sync {'mma.sync' in ptx}, shared {compiled.metadata.shared} B")
        except Exception as exc:
            log(f"    ({kname}: compiled-kernel introspection failed: {type(exc).__name__}: {exc})")


def check_every_config():
    """Every tile config of the grouped GEMMs against fp32 per-expert matmuls (gather/scatter/scale, W and
    W^T), at the 1.5B shape with a skewed, uneven load: the autotuner may pick any of them."""
    import triton

    from blocks.kernels import grouped_gemm as gg
    T, D, F2, E = 16384, 1152, 6144, 8
    gen = torch.Generator(device=DEV).manual_seed(1)
    ids = torch.multinomial(1.0 / torch.arange(1, E + 1, device=DEV, dtype=torch.float), T, True, generator=gen)
    order, offs = permute_slots(ids[:, None], E)
    x = torch.randn(T, D, device=DEV, dtype=BF16, generator=gen)
    w = torch.randn(E, D, F2, device=DEV, dtype=BF16, generator=gen) / math.sqrt(D)
    wt = torch.randn(E, F2, D, device=DEV, dtype=BF16, generator=gen).transpose(1, 2) / math.sqrt(D)
    scale = torch.rand(T, device=DEV)
    bounds = offs.tolist()
    xo = x[order.long()].float()
    ref = {n: torch.cat([xo[a:b] @ ww[e].float() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))]) for n, ww in (("w", w), ("wt", wt))}
    worst = 0.0
    for cfg in gg.GMM_CONFIGS:
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        for name, ww in (("w", w), ("wt", wt)):
            for scatter in (False, True):
                y = torch.full((T, F2), float("nan"), device=DEV, dtype=BF16)
                grid = ((triton.cdiv(T, meta["BLOCK_M"]) + E) * triton.cdiv(F2, meta["BLOCK_N"]),)
                gg._gmm_kernel.fn[grid](
                    x, ww, y, offs, order, order, scale, y, T, F2, D, E,
                    x.stride(0), x.stride(1), ww.stride(0), ww.stride(1), ww.stride(2), y.stride(0), y.stride(1),
                    GATHER_A=True, SCATTER_Y=scatter, SCALE=scatter, GLU=0, EP=triton.next_power_of_2(E), **meta)
                expect = ref[name] * scale[:, None] if scatter else ref[name]
                got = y[order.long()].float() if scatter else y.float()
                err = rel(got, expect)
                worst = max(worst, err if math.isfinite(err) else float("inf"))
                if not err < 1e-2:
                    log(f"  gmm config {meta} W{'^T' if name == 'wt' else ''} scatter={scatter}: rel err {err:.2e} FAIL")
        if meta["BLOCK_M"] * meta["BLOCK_N"] <= 128 * 128:  # the tiles the fused-GLU variant may use
            Fh = F2 // 2
            h = torch.full((T, F2), float("nan"), device=DEV, dtype=BF16)
            act = torch.full((T, Fh), float("nan"), device=DEV, dtype=BF16)
            grid = ((triton.cdiv(T, meta["BLOCK_M"]) + E) * triton.cdiv(Fh, meta["BLOCK_N"]),)
            gg._gmm_kernel.fn[grid](
                x, w, h, offs, order, order, scale, act, T, Fh, D, E,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), h.stride(0), h.stride(1),
                GATHER_A=True, SCATTER_Y=False, SCALE=False, GLU=1, EP=triton.next_power_of_2(E), **meta)
            act_ref = glu(ref["w"])
            for got, expect in ((h, ref["w"]), (act, act_ref)):
                err = rel(got, expect)
                worst = max(worst, err if math.isfinite(err) else float("inf"))
                if not err < 1e-2:
                    log(f"  gmm+glu config {meta}: rel err {err:.2e} FAIL")
    dy = torch.randn(T, F2, device=DEV, dtype=BF16, generator=gen)
    ref_dw = torch.stack([xo[a:b].T @ dy[a:b].float() for a, b in zip(bounds, bounds[1:])])
    for cfg in gg.WGRAD_CONFIGS:
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        dw = torch.full((E, D, F2), float("nan"), device=DEV)
        grid = (E * triton.cdiv(D, meta["BLOCK_K"]) * triton.cdiv(F2, meta["BLOCK_N"]),)
        gg._wgrad_kernel.fn[grid](x, dy, dw, offs, order, F2, D, E, x.stride(0), x.stride(1), dy.stride(0),
                                  dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), GATHER_A=True,
                                  DOT_DTYPE=gg._TL_DTYPES[BF16], **meta)
        err = rel(dw, ref_dw)
        worst = max(worst, err if math.isfinite(err) else float("inf"))
        if not err < 1e-2:
            log(f"  wgrad config {meta}: rel err {err:.2e} FAIL")
    log(f"every grouped-GEMM tile config vs fp32 reference: worst rel err {worst:.1e} {'OK' if worst < 1e-2 else 'FAIL'}")


def routing_alone():
    from routers.sinkhorn import sinkhorn_log_plan
    try:
        from routers.kernels import sinkhorn_topk
    except ImportError:
        sinkhorn_topk = None
    topk_gate = fused_topk()
    log("routing alone (T 16384):")
    for E, k in ((8, 1), (64, 8)):
        logits = torch.randn(16384, E, device=DEV, requires_grad=True)
        g = torch.randn(16384, k, device=DEV)
        cases = {"topk torch fwd+bwd": lambda: torch.autograd.grad(topk_torch(logits, k)[0], logits, g),
                 "sinkhorn torch": lambda: torch.topk(sinkhorn_log_plan(logits.detach(), 0.5, 8), k, -1)}
        if topk_gate is not None:
            cases["topk fused fwd+bwd"] = lambda: torch.autograd.grad(topk_gate(logits, k).weights_TK, logits, g)
        if sinkhorn_topk is not None:
            cases["sinkhorn fused"] = lambda: sinkhorn_topk(logits.detach(), k, temperature=0.5, n_iters=8)
        for cname, fn in cases.items():
            try:
                ms = bench_graph(fn)
                ROWS.append(dict(shape=f"route E{E} k{k}", variant=cname, ms=ms))
                log(f"  E {E:3d} k {k}: {cname:20s} {ms * 1e3:8.1f} us")
            except Exception as exc:
                log(f"  E {E} k {k} {cname} failed: {type(exc).__name__}: {str(exc)[:300]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the per-expert loop variant")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--routings", default="uniform,skewed")
    ap.add_argument("--skip-config-check", action="store_true", help="skip checking every tile config")
    args = ap.parse_args()
    t0 = time.time()
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {__import__('triton').__version__}")
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    log(f"dense bf16 8192^3: {2 * 8192**3 / bench(lambda: a @ a) / 1e9:.0f} TFLOP/s")
    if not args.skip_config_check:
        check_every_config()
    for name in args.shapes.split(","):
        for routing in args.routings.split(","):
            try:
                run_shape(name, routing, args.quick)
            except Exception as exc:
                log(f"{name} {routing} failed: {type(exc).__name__}: {str(exc)[:300]}")
    try:
        routing_alone()
    except Exception as exc:
        log(f"routing alone failed: {type(exc).__name__}: {str(exc)[:300]}")
    log(f"\ntotal {time.time() - t0:.0f} s\n| shape | routing | variant | fwd+bwd ms | TFLOP/s | of dense |\n|---|---|---|---:|---:|---:|")
    for r in ROWS:
        if "tflops" in r:
            log(f"| {r['shape']} | {r['routing']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['vs_dense']:.2f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_moe.json").write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
