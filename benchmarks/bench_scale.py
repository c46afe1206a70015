"""Training throughput of BlackMamba-1.5B on several GPUs: DDP, FSDP and expert parallelism (docs/distributed.md).

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scale.py                  # 2 GPUs, all variants
    torchrun --standalone --nproc_per_node 8 benchmarks/bench_scale.py --variants ddp,ep --batch-size 4
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scale.py --smoke          # CPU, gloo, tiny model

NOT RUN YET: this script was written and checked on the CPU only (--smoke, ddp and ep under gloo); it has never run
on GPUs, and there are no figures from it in benchmarks/RESULTS.md. Run it on 2+ H200 and commit what it prints.

Every variant trains the platform's own model (composed by experiments.config.compose as run.py composes it,
built by LMModule, driven by the Trainer that experiments.train._make_trainer builds) on random token batches,
bf16-mixed on CUDA:

  ddp   trainer.strategy=ddp: weights replicated, gradients all-reduced
  fsdp  trainer.strategy=fsdp: one FSDP unit per block (CUDA only)
  ep    trainer.strategy=ddp with moe.expert_parallel = the number of processes: each GPU holds E/W experts

For each: global tokens/s (all ranks) over the steps after --warmup, the same per GPU, and the peak memory of
rank 0 (torch.cuda.max_memory_allocated). Rank 0 prints a table and writes bench_scale.json under $OUT when it is
set. A variant that fails (out of memory, say) is reported with its reason and the next one runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.config import compose  # noqa: E402
from experiments.module import LMModule  # noqa: E402
from experiments.train import _make_trainer  # noqa: E402


class RandomTokens(IterableDataset):
    def __init__(self, batch: int, seq_len: int, vocab: int, steps: int):
        self.batch, self.seq_len, self.vocab, self.steps = batch, seq_len, vocab, steps

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        g = torch.Generator().manual_seed(rank)
        for _ in range(self.steps):
            w = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
            yield w[:, :-1], w[:, 1:]


class StepTimer(Callback):
    """Wall time of each training step after the warm-up ones (synchronised with the GPU)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def run_variant(name: str, args: argparse.Namespace, world: int) -> dict:
    strategy = "fsdp" if name == "fsdp" else "ddp"
    ep = world if name == "ep" else 1
    argv = [f"model={args.model}", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
            f"trainer.devices={world // args.nodes}", f"trainer.num_nodes={args.nodes}",
            f"trainer.strategy={strategy}", f"moe.expert_parallel={ep}", f"trainer.max_steps={args.steps}",
            "trainer.val_every=1000000", "trainer.progress_bar=false", f"out_dir={args.out_dir}"]
    if args.smoke:
        argv += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    cfg = compose(argv)
    torch.manual_seed(cfg.seed)
    vocab = cfg.model.vocab_size or 256
    module = LMModule(cfg, vocab, 1.0)
    timer = StepTimer(args.warmup)
    trainer = _make_trainer(cfg, "cpu" if args.smoke else "cuda", False, [timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(RandomTokens(args.batch_size, args.seq_len, vocab, args.steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    step_s = sum(timer.times) / max(1, len(timer.times))
    tokens = args.batch_size * args.seq_len * world
    return {"variant": name, "strategy": strategy, "expert_parallel": ep, "world": world,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="ddp,fsdp,ep")
    ap.add_argument("--model", default="blackmamba-1.5b")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per GPU")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--out-dir", default="outputs/bench_scale")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, model=tiny, a few short steps (no fsdp)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.seq_len, args.steps, args.warmup = "tiny", 2, 32, 3, 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 2:
        raise SystemExit("start it with torchrun on 2 or more processes (see the docstring)")
    variants = [v for v in args.variants.split(",") if not (args.smoke and v == "fsdp")]
    results = []
    for name in variants:
        try:
            results.append(run_variant(name, args, world))
        except Exception as e:  # report and go on: one variant out of memory says nothing of the others
            results.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if rank != 0:
        return
    print(f"{args.model}, {world} processes, {args.batch_size} x {args.seq_len} tokens per process")
    print(f"{'variant':<8} {'step s':>8} {'tokens/s':>12} {'per GPU':>10} {'peak GiB':>9} {'loss':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<8} failed: {r['error']}")
        else:
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{r['variant']:<8} {r['step_s']:>8.3f} {r['tokens_per_s']:>12,.0f} "
                  f"{r['tokens_per_s_per_gpu']:>10,.0f} {mem:>9} {r['loss']:>7.3f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_scale.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
