"""Where the GPU time goes: per-kernel CUDA time of the hot paths, from torch.profiler.

    python benchmarks/profile_kernels.py [--only mixer,decode,train] [--top 25]

mixer   the Mamba mixer fwd+bwd at d 1152, B 8 x L 2048, bf16 weights (the bench_scan.py mixer row)
decode  one LM.step of the BlackMamba-1.5B preset at batch 1 and 64, bf16 weights, eager (the kernels a
        CUDA graph replays are the same ones)
train   one fwd+bwd of the BlackMamba-1.5B preset, B 8 x L 2048, bf16 autocast over fp32 weights (what
        bench_train.py's fwd+bwd row times)
train_bf16  the same with the weights cast to bf16 first (bench_train.py's "bf16 w" row)
gaps    where the GPU idles in that fwd+bwd (fp32 weights): the time between one kernel's end and the next one's
        start, summed by the host op that launched the next kernel and that kernel, and the host's CUDA calls
gaps_bf16  the same with bf16 weights
copies  the PyTorch ops of that fwd+bwd (fp32 weights) that launch elementwise, copy and reduction kernels,
        by input shapes, with the CUDA time of the kernels each launched: which copies, casts and
        adds the step still pays for
host    that fwd+bwd timed without the profiler, fp32 and bf16 weights: wall time, and the host's time to enqueue
        it (when the two are close, the host is what bounds it); then the same fwd+bwd replayed from one CUDA
        graph as trainer.cuda_graph=true runs it, its loss against the eager one, and the replay's kernels

Each section prints its kernels by total CUDA time (count, total ms per iteration, share) and the kernel
count per iteration; the tables go to profile_kernels.log under $OUT when it is set. GPU only.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import build as build_lm  # noqa: E402
from blocks.mamba import Mamba, MambaConfig  # noqa: E402

LINES: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def kernel_table(fn, iters: int, title: str, top: int) -> None:
    for _ in range(3):  # compile, autotune, allocate outside the profile
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count > 0]
    total_us = sum(e.self_device_time_total for e in rows)
    n_kernels = sum(e.count for e in rows) / iters
    log(f"\n## {title}: {total_us / iters / 1e3:.3f} ms of kernel time and {n_kernels:.0f} kernels an iteration")
    log("| kernel | calls/iter | ms/iter | share |")
    log("|---|---:|---:|---:|")
    for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:top]:
        log(f"| {e.key[:90]} | {e.count / iters:.0f} | {e.self_device_time_total / iters / 1e3:.4f} | "
            f"{100 * e.self_device_time_total / total_us:.1f}% |")


def mixer(top: int) -> None:
    m = Mamba(1152, MambaConfig(backend="triton")).cuda().bfloat16()
    x = torch.randn(8, 2048, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    params = [x, *m.parameters()]
    kernel_table(lambda: torch.autograd.grad(m(x), params, g), 10, "Mamba mixer fwd+bwd, d 1152, B 8 x L 2048", top)


def decode(top: int) -> None:
    model = build_lm("mamba", smoke=False, device="cuda")
    for batch in (1, 64):
        cache = model.allocate_cache(batch, 64)
        tok = torch.randint(0, 50304, (batch,), device="cuda")
        with torch.no_grad():
            kernel_table(lambda: model.step(tok, cache), 20, f"LM.step, BlackMamba-1.5B, batch {batch}", top)
    del model


def train_step(bf16_weights: bool = False):
    """(setup, module, batch, step): one fwd+bwd of the BlackMamba-1.5B preset at B 8 x L 2048 under bf16
    autocast, as bench_train.py's fwd+bwd row runs it; step() also drops the gradients."""
    from benchmarks.bench_train import Setup, build, lm_loss, token_batch

    setup = Setup(torch.device("cuda"), 8, 2048, (1, 512), warmup=1, reps=1, compile=False, smoke=False)
    module = build("blackmamba-1.5b", setup)
    if bf16_weights:
        module.bfloat16()
    batch = tuple(t.cuda() for t in token_batch(50304, (8, 2048), seed=2))
    module.train()

    def step():
        lm_loss(module, batch, setup).backward()
        module.zero_grad(set_to_none=True)

    return setup, module, batch, step


def train(top: int, bf16_weights: bool = False) -> None:
    _, _, _, step = train_step(bf16_weights)
    weights = "bf16" if bf16_weights else "fp32"
    kernel_table(step, 3, f"fwd+bwd, BlackMamba-1.5B, B 8 x L 2048, bf16 autocast, {weights} weights", top)


def gaps(top: int, bf16_weights: bool = False) -> None:
    import json
    import tempfile
    from collections import defaultdict

    _, _, _, step = train_step(bf16_weights)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    host_calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = {e["args"].get("correlation"): e for e in host_calls}
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    by_tid = defaultdict(list)
    for e in ops:
        by_tid[e["tid"]].append(e)

    def enclosing(launch) -> str:
        # the outermost non-aten op around the launch (an autograd Function, a module), else the innermost op
        around = [e for e in by_tid[launch["tid"]] if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
        around.sort(key=lambda e: e["ts"])
        named = [e["name"] for e in around if not e["name"].startswith(("aten::", "cuda", "autograd::engine"))]
        return (named[0] if named else around[-1]["name"] if around else "?")[:80]

    idle = defaultdict(lambda: [0.0, 0])
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy = sum(k["dur"] for k in kernels)
    for prev, k in zip(kernels, kernels[1:]):
        gap = k["ts"] - (prev["ts"] + prev["dur"])
        if gap > 2.0:
            launch = launches.get(k["args"].get("correlation"))
            key = (enclosing(launch) if launch else "?") + " -> " + k["name"][:40]
            idle[key][0] += gap
            idle[key][1] += 1
    log(f"\n## GPU idle in one fwd+bwd ({'bf16' if bf16_weights else 'fp32'} weights): {span / 1e3:.3f} ms from first kernel to last, "
        f"{busy / 1e3:.3f} ms busy, {(span - busy) / 1e3:.3f} ms idle (gaps > 2 us: "
        f"{sum(v[0] for v in idle.values()) / 1e3:.3f} ms)")
    log("| host op launching the kernel after the gap -> kernel | gaps | idle ms |")
    log("|---|---:|---:|")
    for key, (us, n) in sorted(idle.items(), key=lambda kv: -kv[1][0])[:top]:
        log(f"| {key} | {n} | {us / 1e3:.3f} |")
    syncs = defaultdict(lambda: [0.0, 0])
    for e in host_calls:
        syncs[e["name"]][0] += e.get("dur", 0)
        syncs[e["name"]][1] += 1
    log("| host runtime call | calls | host ms |")
    log("|---|---:|---:|")
    for name, (us, n) in sorted(syncs.items(), key=lambda kv: -kv[1][0])[:12]:
        log(f"| {name} | {n} | {us / 1e3:.3f} |")


def host(top: int) -> None:
    import statistics
    import time

    from benchmarks.bench_train import lm_loss
    from experiments.train_graph import TrainGraph

    setup, module, batch, _ = train_step()
    log("\n## fwd+bwd of BlackMamba-1.5B, B 8 x L 2048: eager against one CUDA graph (median of 10)")
    log("| weights | eager wall ms | host enqueue ms | graph replay ms | graph loss - eager loss |")
    log("|---|---:|---:|---:|---:|")
    for weights in ("fp32", "bf16"):
        if weights == "bf16":
            module.bfloat16()
        walls, enqueues = [], []
        for i in range(13):
            module.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = lm_loss(module, batch, setup)
            loss.backward()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 3:
                walls.append((t2 - t0) * 1e3)
                enqueues.append((t1 - t0) * 1e3)
        eager_loss = float(loss.detach())
        # the whole fwd+bwd in one graph, as trainer.cuda_graph=true runs it (experiments.train_graph)
        module.zero_grad(set_to_none=True)
        graph = TrainGraph(warmup_steps=1)
        with setup.autocast():
            graph.run(module, module._forward_loss, batch)  # the warm-up call: the caller's eager step
            out = graph.run(module, module._forward_loss, batch)
        if out is None:
            replay, diff = f"failed: {graph.disabled}", "-"
        else:
            replays = []
            for i in range(13):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with setup.autocast():
                    graph.run(module, module._forward_loss, batch)
                torch.cuda.synchronize()
                if i >= 3:
                    replays.append((time.perf_counter() - t0) * 1e3)
            replay, diff = f"{statistics.median(replays):.2f}", f"{float(out[2]) - eager_loss:+.2e}"
            with setup.autocast():
                kernel_table(lambda: graph.run(module, module._forward_loss, batch), 2,
                             f"the replayed graph, {weights} weights", top)
        del graph
        module.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        log(f"| {weights} | {statistics.median(walls):.2f} | {statistics.median(enqueues):.2f} | {replay} | {diff} |")


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::_grouped_mm", "aten::linear",
            "aten::matmul", "aten::baddbmm")


def copies(top: int) -> None:
    _, _, _, step = train_step()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key.startswith("aten::") and e.key not in GEMM_OPS and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in rows)
    log(f"\n## PyTorch ops launching non-GEMM kernels in one fwd+bwd (fp32 weights): {total / 1e3:.3f} ms")
    log("| op | input shapes | calls | ms |")
    log("|---|---|---:|---:|")
    for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:top]:
        log(f"| {e.key} | {str(e.input_shapes)[:80]} | {e.count} | {e.self_device_time_total / 1e3:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mixer,decode,train,train_bf16")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: profile_kernels.py needs a CUDA GPU")
    log(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    sections = {"mixer": mixer, "decode": decode, "train": train,
                "train_bf16": lambda top: train(top, bf16_weights=True), "gaps": gaps,
                "gaps_bf16": lambda top: gaps(top, bf16_weights=True), "copies": copies, "host": host}
    for name in args.only.split(","):
        if name not in sections:
            sys.exit(f"error: unknown section '{name}'; valid: {', '.join(sections)}")
        sections[name](args.top)
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile_kernels.log").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
