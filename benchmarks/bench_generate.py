"""Recurrent generation on one GPU: CUDA-graph decoding checked against the plain path, then speed and memory.

    python benchmarks/bench_generate.py [--smoke] [--contexts 1024,8192,65536] [--batches 1,64] [--steps 128]

Models (random init, bf16 weights): the BlackMamba-1.5B preset (conf/model/blackmamba-1.5b.yaml: 15 Mamba +
15 MoE blocks, d 1152, 8 experts of ffn 3072, top-1, vocab 50304) and an attention + MoE model with the same
width, layers and experts (18 heads of 64), whose KV cache holds the full context.

1. Checks, on the real preset: generate() with CUDA graphs gives exactly the tokens of the plain path
   (eager model.step per token), greedy and sampled (same seed), at batch 1 and 64 (the MoE decode path
   reads the routed experts below 8 slots and runs all experts from 8 on); and the fused step that LM.step
   runs on CUDA (blocks/fused_step.py) computes the modules' own steps: teacher-forced steps of both on an
   fp32 copy of the model must agree to 1e-3 of the largest logit (and, for information, both paths in bf16
   against that fp32 reference: max |logit error| over max |logit|, and how often the argmax agrees).
2. Speed: decode tokens/s, ms per step and peak memory per (model, batch, context, greedy/sampled), with CUDA
   graphs at every context and with the plain path at the first context. `context` = prompt + generated
   tokens = the cache's max_len. To stay within minutes, each run prefills at most PREFILL_TOKENS tokens in
   all (the real parallel forward), then jumps the attention write position to context - steps ("fills the
   cache cheaply": the skipped KV slots keep zeros), then times `steps` decode steps. That costs what a
   real long context costs: a decode step attends over the whole static KV cache (masked), and a Mamba
   step's work does not depend on the position at all. A KV cache larger than the free memory is skipped.
   Greedy decoding at the first context is also timed with the decoding kernels launched without
   programmatic dependent launch ("cuda_graph no PDL"; blocks/kernels/decode.py), and at batch 1 without
   the kernels' L2 prefetch of later kernels' weights ("cuda_graph no prefetch").
   Peak memory is that of decoding (weights, cache, graph buffers); the prefill's own peak is in the JSON.
Prints a table last; writes bench_generate.json and bench_generate.log under $OUT when it is set.
--smoke runs the same code on the CPU with tiny models and contexts, without capture (the static decoder
runs eagerly), so that the script is exercised by the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.attention import AttentionCache, AttentionConfig  # noqa: E402
from blocks.mamba import MambaConfig  # noqa: E402
from blocks.model import LM, ModelConfig  # noqa: E402
from blocks.moe import MoE, MoEConfig  # noqa: E402
from blocks.kernels import decode, force_triton, interpreting, pytorch_reference  # noqa: E402
from experiments.cuda_graphs import StaticDecoder  # noqa: E402
from experiments.decoding import generate_eager  # noqa: E402

PREFILL_TOKENS = 65536  # batch x prompt tokens prefilled per run
SAMPLING = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_k=50, top_p=0.95)}
LINES: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LINES.append(msg)


def build(mixer: str, smoke: bool, device: str) -> LM:
    """The BlackMamba-1.5B preset (mixer=mamba) or its attention twin; tiny ones for --smoke."""
    if smoke:
        cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=4, ffn_dim=128)
        moe, heads = MoEConfig(num_experts=4, top_k=1, router="sinkhorn"), 4
    else:
        cfg = ModelConfig(vocab_size=50304, d_model=1152, n_layers=30, ffn_dim=3072, final_norm="layernorm")
        moe, heads = MoEConfig(num_experts=8, top_k=1, router="sinkhorn"), 18
    mixer_cfg = MambaConfig() if mixer == "mamba" else AttentionConfig(n_heads=heads)
    torch.manual_seed(0)
    with torch.device(device):
        model = LM(cfg, mixer, mixer_cfg, moe)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(dtype).eval()


def active_params(model: LM) -> int:
    """Parameters one token uses: all but the experts it is not routed to."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, MoE):
            total -= (m.w_in.numel() + m.w_out.numel()) * (m.num_experts - m.top_k) // m.num_experts
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_tokens(name: str, model: LM, batch: int, device: str, capture: bool, new_tokens: int) -> dict:
    """CUDA-graph tokens == plain-path tokens, greedy and sampled from the same seed."""
    vocab = model.embedding.num_embeddings
    prompt = torch.randint(0, vocab, (batch, 32), device=device, generator=torch.Generator(device).manual_seed(1))
    row = {"model": name, "batch": batch, "new_tokens": new_tokens}
    for mode, kw in SAMPLING.items():
        plain = generate_eager(model, prompt, new_tokens, **kw, generator=torch.Generator(device).manual_seed(0))
        decoder = StaticDecoder(model, batch, 32 + new_tokens, **kw, capture=capture)
        graph = decoder.generate(prompt, new_tokens, torch.Generator(device).manual_seed(0))
        row[mode] = bool(torch.equal(plain, graph))
        row[f"{mode}_first_mismatch"] = None if row[mode] else int((plain != graph).any(0).float().argmax())
        del decoder
    log(f"check {name} batch {batch}: greedy {'same' if row['greedy'] else 'DIFFERENT'}, "
        f"sampled {'same' if row['sampled'] else 'DIFFERENT'} ({new_tokens} tokens, graph vs plain)")
    return row


def check_fused(name: str, model: LM, batch: int, device: str, steps: int = 16) -> dict:
    """The fused step against the modules' steps on an fp32 copy of the model (teacher-forced: the same tokens
    fed to both; must agree to 1e-3 of the largest logit), and, for information, both in the model's dtype
    against that fp32 reference (with random weights, bf16 rounding flips near-tied routing decisions, so those
    errors are large for either path). On the CPU the fused side runs through Triton's interpreter."""
    vocab = model.embedding.num_embeddings
    g = torch.Generator(device).manual_seed(3)
    prompt = torch.randint(0, vocab, (batch, 16), device=device, generator=g)
    tokens = torch.randint(0, vocab, (batch, steps), device=device, generator=g)
    fused_ctx = contextlib.nullcontext if device == "cuda" else force_triton if interpreting() else None
    if fused_ctx is None:
        log(f"check {name} batch {batch}: fused step not run (CPU without TRITON_INTERPRET=1)")
        return {"model": name, "batch": batch, "fused_ok": True, "skipped": "no Triton on this device"}

    def run(m: LM, ctx) -> torch.Tensor:
        cache = m.allocate_cache(batch, 16 + steps)
        with torch.no_grad():
            with pytorch_reference():  # the same prefill for every path
                m(prompt, cache)
            with ctx():
                return torch.stack([m.step(tokens[:, t], cache).float() for t in range(steps)])

    def compare(out: torch.Tensor, ref: torch.Tensor, label: str) -> None:
        row[f"{label}_rel_err"] = float((out - ref).abs().max() / ref.abs().max())
        row[f"{label}_argmax_agree"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())

    row = {"model": name, "batch": batch, "steps": steps}
    m32 = copy.deepcopy(model).float()
    ref = run(m32, pytorch_reference)
    compare(run(m32, fused_ctx), ref, "fused")
    del m32
    if model.embedding.weight.dtype != torch.float32:
        compare(run(model, fused_ctx), ref, "fused_lowp")
        compare(run(model, pytorch_reference), ref, "modules_lowp")
    row["fused_ok"] = row["fused_rel_err"] < 1e-3
    lowp = (f"; in {model.embedding.weight.dtype}: fused {row['fused_lowp_rel_err']:.2e} "
            f"({100 * row['fused_lowp_argmax_agree']:.0f}%), modules {row['modules_lowp_rel_err']:.2e} "
            f"({100 * row['modules_lowp_argmax_agree']:.0f}%)") if "fused_lowp_rel_err" in row else ""
    log(f"check {name} batch {batch}: fused step vs the modules' steps, fp32: rel err {row['fused_rel_err']:.2e}, "
        f"argmax agrees {100 * row['fused_argmax_agree']:.0f}% ({'ok' if row['fused_ok'] else 'MISMATCH'}){lowp}")
    return row


def kernels_per_step(model: LM, device: str) -> str:
    """GPU kernels one decode step launches (batch 1, greedy), what a CUDA graph replays in one launch,
    and the most frequent ones: where fusing would cut the per-token time."""
    if device != "cuda":
        return "n/a on the CPU"
    from torch.profiler import ProfilerActivity, profile

    decoder = StaticDecoder(model, 1, 64, temperature=0.0, capture=False)
    decoder.prefill(torch.zeros(1, 8, dtype=torch.long, device=device))
    decoder.advance()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.advance()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    top = ", ".join(f"{n} {name[:60]}" for name, n in names.most_common(8))
    return f"{sum(names.values())} (most frequent: {top})"


def kv_cache_bytes(model: LM, batch: int, context: int) -> int:
    dtype_bytes = model.embedding.weight.element_size()
    per_token = sum(2 * b.mixer.G * b.mixer.K for b in model.layers if hasattr(b, "mixer") and hasattr(b.mixer, "G"))
    return batch * context * per_token * dtype_bytes


def jump_positions(cache: list, pos: int) -> None:
    """Move every attention cache's write position to pos (the slots skipped keep what they hold: zeros)."""
    for c in cache:
        if isinstance(c, AttentionCache):
            c.pos.fill_(pos)


def measure(name: str, model: LM, batch: int, context: int, mode: str, capture: bool, steps: int, device: str,
            tag: str = "") -> dict:
    row = {"model": name, "batch": batch, "context": context, "sampling": mode,
           "decode": (("cuda_graph" if device == "cuda" else "static") if capture is not False else "plain") + tag}
    warm = 4
    if steps + warm + 1 >= context:
        raise ValueError(f"context {context} is too short for {steps} timed steps")
    if device == "cuda":
        torch.cuda.empty_cache()
        need, free = kv_cache_bytes(model, batch, context), torch.cuda.mem_get_info()[0]
        if need > 0.9 * free:
            row["skipped"] = f"KV cache {need / 2**30:.0f} GiB > free {free / 2**30:.0f} GiB"
            log(f"{name} batch {batch} context {context} {mode}: skipped, {row['skipped']}")
            return row
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device).manual_seed(0)
    decoder = StaticDecoder(model, batch, context, **SAMPLING[mode], capture=bool(capture) and device == "cuda")
    prompt_len = min(context - steps - warm, max(1, PREFILL_TOKENS // batch))
    prompt = torch.randint(0, model.embedding.num_embeddings, (batch, prompt_len), device=device, generator=gen)
    sync(device)
    t0 = time.perf_counter()
    decoder.prefill(prompt, gen)
    sync(device)
    row["prefill_tokens"], row["prefill_s"] = prompt_len, time.perf_counter() - t0
    if device == "cuda":  # the prefill's logits (batch x prompt x vocab) are gone: measure decoding alone
        row["prefill_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    jump_positions(decoder.cache, context - steps - warm)
    for _ in range(warm):
        decoder.advance(gen)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder.advance(gen)
    sync(device)
    dt = time.perf_counter() - t0
    row.update(steps=steps, ms_per_step=1e3 * dt / steps, tokens_per_s=batch * steps / dt)
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del decoder
    log(f"{name} batch {batch} context {context} {mode} {row['decode']}: {row['tokens_per_s']:.0f} tok/s, "
        f"{row['ms_per_step']:.3f} ms/step, peak {row.get('peak_gib', float('nan')):.1f} GiB "
        f"(prefilled {prompt_len} in {row['prefill_s']:.2f} s)")
    return row


def table(rows: list[dict]) -> None:
    log("\n| model | batch | context | sampling | decode | tokens/s | ms/step | peak GiB |\n|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            log(f"| {r['model']} | {r['batch']} | {r['context']} | {r['sampling']} | {r['decode']} | {r['skipped']} | | |")
        elif "tokens_per_s" in r:
            log(f"| {r['model']} | {r['batch']} | {r['context']} | {r['sampling']} | {r['decode']} | "
                f"{r['tokens_per_s']:.0f} | {r['ms_per_step']:.3f} | {r.get('peak_gib', float('nan')):.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models and contexts on the CPU, no capture")
    ap.add_argument("--contexts", default=None, help="prompt + generated tokens, comma-separated")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per run")
    ap.add_argument("--plain-steps", type=int, default=None, help="timed steps of the plain (eager) path")
    ap.add_argument("--models", default="blackmamba,attention")
    args = ap.parse_args(argv)
    LINES.clear()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("error: no CUDA device; run with --smoke on the CPU")
        return 2
    contexts = [int(c) for c in (args.contexts or ("48,64" if args.smoke else "1024,8192,65536")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,3" if args.smoke else "1,64")).split(",")]
    steps = args.steps or (4 if args.smoke else 128)
    plain_steps = args.plain_steps or (4 if args.smoke else 32)
    capture = device == "cuda"
    t_start = time.time()
    log(f"{torch.cuda.get_device_name() if capture else 'cpu'} torch {torch.__version__}; "
        f"prefill <= {PREFILL_TOKENS} tokens per run, then the attention position jumps to context - steps")
    checks, rows = [], []
    for name in args.models.split(","):
        model = build({"blackmamba": "mamba", "attention": "attention"}[name], args.smoke, device)
        log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{active_params(model) / 1e6:.1f}M active, pattern {model.pattern[:2]} x {len(model.pattern) // 2}")
        try:
            log(f"{name}: GPU kernels per eager decode step (batch 1, greedy): {kernels_per_step(model, device)}")
        except Exception as exc:  # a diagnostic only
            log(f"{name}: kernel count failed: {type(exc).__name__}: {str(exc)[:200]}")
        for batch in batches:
            checks.append(check_tokens(name, model, batch, device, capture, 8 if args.smoke else 48))
            checks.append(check_fused(name, model, batch, device, 4 if args.smoke else 16))
        for batch in batches:
            for mode in SAMPLING:
                rows.append(measure(name, model, batch, contexts[0], mode, False, plain_steps, device))
                for context in contexts:
                    try:
                        rows.append(measure(name, model, batch, context, mode, True, steps, device))
                    except torch.OutOfMemoryError as exc:
                        rows.append({"model": name, "batch": batch, "context": context, "sampling": mode,
                                     "decode": "cuda_graph", "skipped": f"out of memory: {str(exc)[:80]}"})
                        log(f"{name} batch {batch} context {context} {mode}: out of memory")
                if capture and mode == "greedy" and decode.PDL:  # what programmatic dependent launch gains
                    decode.PDL = False
                    try:
                        rows.append(measure(name, model, batch, contexts[0], mode, True, steps, device, " no PDL"))
                    finally:
                        decode.PDL = True
                if capture and mode == "greedy" and batch == 1 and decode.PREFETCH:  # what the L2 prefetch gains
                    decode.PREFETCH = False
                    try:
                        rows.append(measure(name, model, batch, contexts[0], mode, True, steps, device,
                                            " no prefetch"))
                    finally:
                        decode.PREFETCH = True
        del model
        if capture:
            torch.cuda.empty_cache()
    same = all(c["greedy"] and c["sampled"] for c in checks if "greedy" in c)
    fused_ok = all(c["fused_ok"] for c in checks if "fused_ok" in c)
    ok = same and fused_ok
    log(f"\ntotal {time.time() - t_start:.0f} s; CUDA-graph tokens == plain-path tokens: {'yes' if same else 'NO'}; "
        f"fused step == modules' steps in fp32: {'yes' if fused_ok else 'NO'}")
    table(rows)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        out.joinpath("bench_generate.json").write_text(json.dumps({"checks": checks, "rows": rows}, indent=1))
        out.joinpath("bench_generate.log").write_text("\n".join(LINES) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
