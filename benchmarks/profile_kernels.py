"""Where the GPU time goes: per-kernel CUDA time of the hot paths, from torch.profiler.

    python benchmarks/profile_kernels.py [--only mixer,decode,train] [--top 25]

mixer   the Mamba mixer fwd+bwd at d 1152, B 8 x L 2048, bf16 weights (the bench_scan.py mixer row)
decode  one LM.step of the BlackMamba-1.5B preset at batch 1 and 64, bf16 weights, eager (the kernels a
        CUDA graph replays are the same ones)
train   one fwd+bwd of the BlackMamba-1.5B preset, B 8 x L 2048, bf16 autocast over fp32 weights (what
        bench_train.py's fwd+bwd row times)

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


def train(top: int) -> None:
    from benchmarks.bench_train import Setup, build, lm_loss, token_batch

    setup = Setup(torch.device("cuda"), 8, 2048, (1, 512), warmup=1, reps=1, compile=False, smoke=False)
    module = build("blackmamba-1.5b", setup)
    batch = tuple(t.cuda() for t in token_batch(50304, (8, 2048), seed=2))
    module.train()

    def step():
        lm_loss(module, batch, setup).backward()
        module.zero_grad(set_to_none=True)

    kernel_table(step, 3, "fwd+bwd, BlackMamba-1.5B, B 8 x L 2048, bf16 autocast", top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mixer,decode,train")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: profile_kernels.py needs a CUDA GPU")
    log(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    sections = {"mixer": mixer, "decode": decode, "train": train}
    for name in args.only.split(","):
        if name not in sections:
            sys.exit(f"error: unknown section '{name}'; valid: {', '.join(sections)}")
        sections[name](args.top)
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile_kernels.log").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
