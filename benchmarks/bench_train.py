"""Whole-model training step on one GPU, bf16-mixed, B 8 x L 2048: the BlackMamba presets and baselines.

    python benchmarks/bench_train.py [--models blackmamba-1.5b,transformer] [--no-compile] [--offtheshelf PATH]
                                      [--ablate add_norm,cross_entropy,gate,moe_experts | all]
    python benchmarks/bench_train.py --smoke     # the same code on the CPU: tiny shapes, fp32, no compile

Every model is composed by experiments.config.compose, as run.py composes it, and built by LMModule, so it is
the platform's own. The baselines match the shapes of the off-the-shelf anchor (d 1152, 15 mixers + 15 MLPs,
vocab 50304, 8 experts of ffn 3072, attention 18 heads of 64). For each model:

  check     (after one untimed step at the timed shape) the loss and gradient norm with the kernels against the PyTorch reference path
            (blocks.kernels.pytorch_reference) on the same weights and batch, to bf16 tolerance; then, from the
            first steps of `step` below, that the training loss is finite and falls
  fwd+bwd   model forward, loss (LMModule's, with the routers' aux losses) and backward under bf16 autocast
            with fp32 weights, which is what Lightning's bf16-mixed runs; no optimizer
  without   (--ablate) fwd+bwd again with one kernel at a time on its PyTorch twin (pytorch_reference(name)):
            what that kernel buys, in the same process
  bf16 w    fwd+bwd again after casting the weights to bf16 (trainer.precision=bf16-true, as the anchor runs)
  step      the whole training step as a run takes it: Lightning's Trainer (the one experiments.train builds)
            driving LMModule.training_step, backward, the non-finite check, gradient clipping, the AdamW of
            configure_optimizers (optim.impl=auto: fused on a GPU), the LR schedule and zero_grad; timed between
            steps inside fit, so the Trainer's own overhead is included; "step foreach AdamW" the same with
            optim.impl=foreach; "step, CUDA graph" the same with trainer.cuda_graph=true (the fwd+bwd replayed
            from one CUDA graph after one eager step) on a fresh copy of the initial weights, its first losses
            checked against the eager step's; "step, master weights" (and with the CUDA graph) the same with
            optim.master_weights=true: bf16 weights, AdamW on fp32 masters (experiments/master_adamw.py)
  compiled  both again with every block torch.compile'd (one graph per block kind, which all layers of that
            kind reuse, so compiling is paid per block kind, not per layer); a failure is printed with its reason

Reports tokens/s, 6N-MFU (6 x active parameters x tokens/s over a dense bf16 matmul peak measured in the same
process) and peak memory (torch.cuda.max_memory_allocated, reset per variant). Order: the eager figures of
every model; then --offtheshelf PATH, the anchor script in a subprocess (its GPU memory its own), whose printed
lines give ours / off-the-shelf per model; then the compiled variants, each started only while the run is
younger than --budget-s, so the whole run keeps to its GPU time. Table last; bench_train.json and
bench_train.log under $OUT when it is set.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks import scan_backend  # noqa: E402
from blocks.kernels import KERNELS, pytorch_reference  # noqa: E402
from blocks.mamba import Mamba  # noqa: E402
from experiments.config import compose  # noqa: E402
from experiments.module import LMModule  # noqa: E402
from experiments.throughput import matmul_peak_flops  # noqa: E402
from experiments.train import _make_trainer, _quiet  # noqa: E402  (the run's own Trainer settings)
from experiments.train_graph import TrainGraph  # noqa: E402

ATTENTION = ("mixer=attention", "mixer.n_heads=18")  # 18 heads of 64 at d 1152, as the anchor
# name: (overrides, the anchor script's line for the same shape or None)
MODELS = {
    "blackmamba-1.5b": (("model=blackmamba-1.5b", "router=sinkhorn"), "blackmamba mamba+moe(sinkhorn)"),
    "blackmamba-1.5b-top1": (("model=blackmamba-1.5b", "router=top1"), "blackmamba mamba+moe(top1)"),
    "blackmamba-2.8b": (("model=blackmamba-2.8b", "router=sinkhorn"), None),
    "mamba-mlp": (("model=blackmamba-1.5b", "model.mlp=mlp"), "dense mamba+mlp"),
    "transformer": (("model=blackmamba-1.5b", *ATTENTION, "model.mlp=mlp"), "transformer attn+mlp"),
    "transformer-moe": (("model=blackmamba-1.5b", *ATTENTION, "router=top1"), "transformer attn+moe(top1)"),
}
SMOKE = ("model.d_model=64", "model.n_layers=4", "model.ffn_dim=128", "model.vocab_size=512")
CHECK_LOSS_RTOL, CHECK_GRAD_RTOL = 1e-2, 5e-2  # bf16 (8 bits of mantissa) through 30 layers
LOSS_STEPS = 3  # training steps whose losses the check reads (all before the timed window)
OFFTHESHELF_TIMEOUT_S = 240  # it takes about a minute; a hang must not eat the GPU run
ANCHOR_LINE = re.compile(r"^(?P<name>.+?)\s+total\s+\d+M active\s+\d+M\s+fwd\+bwd\s+[\d.]+ ms\s+(?P<tps>\d+) tok/s")


@dataclass
class Setup:
    """What differs between the GPU run and --smoke."""

    device: torch.device
    batch: int
    seq_len: int
    check_shape: tuple[int, int]  # (B, L) of the kernel-vs-reference check
    warmup: int  # untimed calls before the timed ones
    reps: int  # timed calls (fwd+bwd) or timed steps (step)
    compile: bool
    smoke: bool
    mixer_backend: str = "auto"  # mixer.backend of the Mamba models
    ablate: tuple[str, ...] = ()  # kernels (blocks.kernels.KERNELS) timed off one at a time (--ablate)
    peak: float = 0.0  # dense matmul FLOP/s, measured in this process
    log_file: Path | None = None

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # --smoke: fp32, as run.py on a CPU

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


@dataclass
class Result:
    name: str
    params_total: int = 0
    params_active: int = 0
    check: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)  # variant -> {ms, tokens_per_s, mfu_6n, peak_mem_gb}
    notes: list = field(default_factory=list)


def log(setup: Setup | None, msg: str) -> None:
    print(msg, flush=True)
    if setup is not None and setup.log_file is not None:
        with setup.log_file.open("a") as f:
            f.write(msg + "\n")


def millions(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def run_config(name: str, setup: Setup, steps: int):
    overrides, _ = MODELS[name]
    argv = [*overrides, f"data.seq_len={setup.seq_len}", f"data.batch_size={setup.batch}",
            f"trainer.max_steps={steps}", "trainer.progress_bar=false", f"out_dir={Path('outputs') / 'bench_train'}"]
    if "mixer=attention" not in overrides:
        argv.append(f"mixer.backend={setup.mixer_backend}")
    if setup.smoke:
        heads = ["mixer.n_heads=4"] if "mixer=attention" in overrides else []
        argv += [*SMOKE, *heads, "trainer.accelerator=cpu"]
    return compose(argv)


def token_batch(vocab: int, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of ids in [0, min(256, vocab)): a byte-range batch, whose unigram shift a model learns in its first
    steps, so the loss falls measurably over a few steps (uniform ids over the whole vocabulary cannot)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(256, vocab), (shape[0], shape[1] + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def lm_loss(module: LMModule, batch, setup: Setup) -> torch.Tensor:
    """The training loss as LMModule.training_step forms it: next-token cross-entropy + the routers' aux losses."""
    with setup.autocast():
        loss, aux = module._lm_loss(batch)
        return loss + sum(aux.values()) if aux else loss


def grad_norm(module: LMModule) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@contextlib.contextmanager
def reference_path(module: LMModule):
    """Every op on its PyTorch reference: the kernels' switch, and backend=torch for the Mamba mixers (an
    explicit mixer.backend=triton or mamba_ssm does not consult the switch)."""
    mixers = [m for m in module.modules() if isinstance(m, Mamba)]
    saved = [m.backend for m in mixers]
    try:
        with pytorch_reference():
            for m in mixers:
                m.backend = "torch"
            yield
    finally:
        for m, b in zip(mixers, saved):
            m.backend = b


def check_kernels(module: LMModule, setup: Setup) -> dict:
    """Loss and gradient norm on one batch with the kernels, and with the PyTorch references, same weights."""
    vocab = module.model.cfg.vocab_size
    batch = tuple(t.to(setup.device) for t in token_batch(vocab, setup.check_shape, seed=1))
    out = {}
    for path, ctx in (("kernels", contextlib.nullcontext()), ("reference", reference_path(module))):
        module.zero_grad(set_to_none=True)
        with ctx:
            loss = lm_loss(module, batch, setup)
            loss.backward()
        out[path] = (float(loss.detach()), grad_norm(module))
    module.zero_grad(set_to_none=True)
    (lk, gk), (lr, gr) = out["kernels"], out["reference"]
    loss_rel, grad_rel = abs(lk - lr) / abs(lr), abs(gk - gr) / max(gr, 1e-30)
    ok = math.isfinite(lk) and loss_rel <= CHECK_LOSS_RTOL and grad_rel <= CHECK_GRAD_RTOL
    return {"loss_kernels": lk, "loss_reference": lr, "loss_rel": loss_rel, "grad_norm_kernels": gk,
            "grad_norm_reference": gr, "grad_norm_rel": grad_rel, "kernels_match": ok}


def time_ms(fn, setup: Setup, before=None) -> float:
    """Median time of `fn` in ms over setup.reps calls after setup.warmup (CUDA events on a GPU);
    `before` runs ahead of each call, untimed."""
    for _ in range(setup.warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(setup.reps):
        if before:
            before()
        setup.sync()
        if setup.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def reset_memory(setup: Setup) -> None:
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(setup: Setup) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if setup.device.type == "cuda" else None


def record(result: Result, variant: str, ms: float, setup: Setup) -> None:
    tps = setup.batch * setup.seq_len / ms * 1e3
    row = {"ms": ms, "tokens_per_s": tps, "mfu_6n": 6 * result.params_active * tps / setup.peak,
           "peak_mem_gb": peak_gb(setup)}
    result.variants[variant] = row
    mem = f"{row['peak_mem_gb']:.1f} GB" if row["peak_mem_gb"] is not None else "-"
    log(setup, f"  {variant:<16} {ms:9.2f} ms  {tps:10,.0f} tok/s  6N-MFU {100 * row['mfu_6n']:5.1f}%  peak {mem}")


def time_fwd_bwd(module: LMModule, result: Result | None, variant: str, setup: Setup, warmup_only: bool = False) -> None:
    vocab = module.model.cfg.vocab_size
    batch = tuple(t.to(setup.device) for t in token_batch(vocab, (setup.batch, setup.seq_len), seed=2))
    module.train()
    reset_memory(setup)

    def step():
        lm_loss(module, batch, setup).backward()

    if warmup_only:
        step()
        module.zero_grad(set_to_none=True)
        return
    ms = time_ms(step, setup, before=lambda: module.zero_grad(set_to_none=True))
    module.zero_grad(set_to_none=True)
    record(result, variant, ms, setup)


class StepTimer(Callback):
    """Reads the first LOSS_STEPS training losses, then times `reps` steps after `warmup` of them; the clock is
    read after a device sync at both ends of the window only, so the steps inside run as in a real run."""

    def __init__(self, setup: Setup, warmup: int):
        self.setup, self.warmup = setup, warmup
        self.losses: list[float] = []
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.losses) < LOSS_STEPS:
            self.losses.append(float(outputs["loss"]))
        if trainer.global_step in (self.warmup, self.warmup + self.setup.reps):
            self.setup.sync()
            self.marks.append(time.perf_counter())


class Repeat(IterableDataset):
    """The same batch, endlessly (as the run's train stream is endless; max_steps ends fit)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def time_train_step(module: LMModule, result: Result, variant: str, setup: Setup) -> list[float]:
    """The Trainer's whole step on one fixed batch (moved to the device each step, as a run's batches are).
    Returns the first training losses."""
    warmup = max(setup.warmup, LOSS_STEPS)
    assert module.cfg.trainer.max_steps == warmup + setup.reps, "run_config(steps=...) sets the trainer's length"
    batch = token_batch(module.model.cfg.vocab_size, (setup.batch, setup.seq_len), seed=3)
    timer = StepTimer(setup, warmup)
    trainer = _make_trainer(module.cfg, setup.device.type, False, [timer])
    reset_memory(setup)
    trainer.fit(module, train_dataloaders=DataLoader(Repeat(batch), batch_size=None))
    if len(timer.marks) != 2:
        raise RuntimeError(f"the trainer ran {trainer.global_step} of {module.cfg.trainer.max_steps} steps")
    record(result, variant, (timer.marks[1] - timer.marks[0]) / setup.reps * 1e3, setup)
    del trainer
    module.zero_grad(set_to_none=True)
    return timer.losses


def compile_blocks(module: LMModule) -> None:
    """torch.compile each block in place: its forward and its branch (what LM.forward's kernel path calls,
    the residual add and norm being kernels). Blocks of one kind share their code and, with nn.Module inlining
    (the default), their graphs: the compile cost is paid once per block kind, not once per layer."""
    for block in module.model.layers:
        block.compile()
        block.branch = torch.compile(block.branch)


def build(name: str, setup: Setup) -> LMModule:
    torch.manual_seed(0)
    cfg = run_config(name, setup, steps=max(setup.warmup, LOSS_STEPS) + setup.reps)
    with setup.device:  # weights made on the device: a 2.8B model initialises in a second, not a minute
        module = LMModule(cfg, cfg.model.vocab_size)
    module.train()
    return module


def check_training(module: LMModule, result: Result, variant: str, setup: Setup) -> None:
    """Time the Trainer's step; its first losses must be finite and fall."""
    losses = time_train_step(module, result, variant, setup)
    falls = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    result.check[f"{variant}: train_losses"] = losses
    result.check["loss_falls"] = result.check.get("loss_falls", True) and falls
    log(setup, f"  check ({variant}): training losses {', '.join(f'{v:.4f}' for v in losses)}: "
               f"{'fall' if falls else 'DO NOT FALL'}")


def bench_eager(name: str, setup: Setup) -> Result:
    result = Result(name)
    module = build(name, setup)
    acc = module.accounting
    result.params_total, result.params_active = acc.total_params, acc.active_params
    log(setup, f"\n{name}: {millions(acc.total_params)} params, {millions(acc.active_params)} active; "
               f"overrides {' '.join(MODELS[name][0])}")
    # one untimed step at the timed shape first: the grouped-GEMM autotuner keys on the weight shapes, not the
    # token count, so whichever shape it first sees picks the tiles used from then on
    time_fwd_bwd(module, None, "", setup, warmup_only=True)
    result.check = check_kernels(module, setup)
    c = result.check
    log(setup, f"  check: loss kernels {c['loss_kernels']:.5f} reference {c['loss_reference']:.5f} "
               f"(rel {c['loss_rel']:.1e}), grad norm rel {c['grad_norm_rel']:.1e}: "
               f"{'ok' if c['kernels_match'] else 'MISMATCH'}")
    time_fwd_bwd(module, result, "fwd+bwd", setup)
    for kernel in setup.ablate:  # what each kernel buys: the same fwd+bwd with it alone on its PyTorch twin
        with pytorch_reference(kernel):
            time_fwd_bwd(module, result, f"fwd+bwd without {kernel}", setup)
    check_training(module, result, "step", setup)
    # the same step with the multi-tensor AdamW (optim.impl=foreach) instead of the run's default (fused on a GPU)
    impl = module.cfg.optim.impl
    module.cfg.optim.impl = "foreach"
    time_train_step(module, result, "step foreach AdamW", setup)
    module.cfg.optim.impl = impl
    time_fresh_step(name, result, setup, graph=True)
    for graph in (False, True):  # a failure here fails the model's check and keeps the other figures
        try:
            time_fresh_step(name, result, setup, graph=graph, master=True)
        except Exception as e:  # noqa: BLE001
            result.check["master_weights_match_eager"] = False
            result.notes.append(f"step, master weights{', CUDA graph' if graph else ''} failed: {failure(e)}")
            log(setup, f"  {result.notes[-1]}")
            reset_memory(setup)
    # bf16 weights (trainer.precision=bf16-true), as the off-the-shelf anchor runs: autocast has no weight
    # left to cast, so the difference to "fwd+bwd" is what the per-use casts of fp32 weights cost
    module.to(setup.device, torch.bfloat16)
    time_fwd_bwd(module, result, "fwd+bwd bf16 weights", setup)
    if scan_backend._choices:  # mixer.backend=auto picks mamba-ssm's scan where it measured faster
        picks = sorted({(k[:4], k[-1], v) for k, v in scan_backend._choices.items()}, key=str)  # (B, L, E, N), bwd
        result.notes.append(f"scan backend per ((B, L, E, N), with backward, pick): {picks}")
        log(setup, f"  {result.notes[-1]}")
    return result


def time_fresh_step(name: str, result: Result, setup: Setup, graph: bool = False, master: bool = False) -> None:
    """The Trainer's step on a fresh copy of the same initial weights, with trainer.cuda_graph=true
    (experiments/train_graph.py: one eager step, then the fwd+bwd captured and replayed) and/or
    optim.master_weights=true (bf16 weights, AdamW on fp32 masters: experiments/master_adamw.py). Its first
    losses must be the eager step's (same weights, same batch), to bf16 tolerance. --smoke runs the same code
    uncaptured on the CPU (master weights there under bf16-mixed, which a GPU run takes by default)."""
    module = build(name, setup)
    variant = "step" + (", master weights" if master else "") + (", CUDA graph" if graph else "")
    if master:
        module.cfg.optim.master_weights = True
        if setup.smoke:
            module.cfg.trainer.precision = "bf16-mixed"
    tg = module.train_graph = TrainGraph(warmup_steps=1, capture=setup.device.type == "cuda") if graph else None
    losses = time_train_step(module, result, variant, setup)
    eager = result.check["step: train_losses"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, eager))
    ok = rel <= CHECK_LOSS_RTOL and (tg is None or (tg.disabled is None and tg.recorded))
    if master:
        ok = ok and all(p.dtype == torch.bfloat16 for p in module.parameters())
    key = "master_weights_match_eager" if master else "cuda_graph_matches_eager"
    result.check.update({f"{variant}: train_losses": losses, key: result.check.get(key, True) and ok})
    why = f" (capture failed: {tg.disabled}; the row is eager)" if tg is not None and tg.disabled else ""
    log(setup, f"  check ({variant}): training losses {', '.join(f'{v:.4f}' for v in losses)} against the eager "
               f"step's: worst rel {rel:.1e}: {'same' if ok else 'DIFFERENT'}{why}")
    del module, tg
    reset_memory(setup)


def bench_compiled(result: Result, setup: Setup) -> None:
    """The same model built afresh with every block compiled; a compile failure is recorded with its reason."""
    log(setup, f"\n{result.name}, compiled blocks:")
    module = build(result.name, setup)
    compile_blocks(module)
    try:
        batch = tuple(t.to(setup.device) for t in token_batch(module.model.cfg.vocab_size,
                                                              (setup.batch, setup.seq_len), seed=4))
        t0 = time.perf_counter()
        lm_loss(module, batch, setup).backward()
        setup.sync()
        log(setup, f"  first fwd+bwd {time.perf_counter() - t0:.1f} s (compiling included)")
        module.zero_grad(set_to_none=True)
        time_fwd_bwd(module, result, "fwd+bwd compiled", setup)
        check_training(module, result, "step compiled", setup)
    except Exception as e:  # noqa: BLE001  (a graph dynamo or inductor cannot take: say why, keep the eager figures)
        result.notes.append(f"torch.compile failed: {failure(e)}")
        log(setup, f"  torch.compile failed: {failure(e)}")
    finally:
        del module
        torch._dynamo.reset()
        reset_memory(setup)


def failure(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def bench_all_eager(names: list[str], setup: Setup) -> list[Result]:
    """Eager figures of every model. A model that fails (out of memory, a kernel error) is reported and the
    others still run."""
    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            results.append(bench_eager(name, setup))
        except Exception as e:  # noqa: BLE001  (any failure of one model must leave the others' figures)
            log(setup, f"  {name} failed: {failure(e)}")
            results.append(Result(name, notes=[f"failed: {failure(e)}"]))
        reset_memory(setup)
        log(setup, f"  ({time.perf_counter() - t0:.0f} s)")
    return results


def bench_all_compiled(results: list[Result], setup: Setup, t_start: float, budget_s: float) -> None:
    """Compiled figures, in the order the models were given, each started only while the budget lasts."""
    for result in results:
        if not result.variants:
            continue
        if time.perf_counter() - t_start > budget_s:
            result.notes.append(f"compile variants skipped: --budget-s {budget_s:.0f} reached")
            continue
        t0 = time.perf_counter()
        bench_compiled(result, setup)
        log(setup, f"  ({time.perf_counter() - t0:.0f} s)")


def run_offtheshelf(path: str, setup: Setup) -> dict[str, float]:
    """Run the anchor script (its own process, so its CUDA memory is its own) and read tokens/s per line."""
    log(setup, f"\noff-the-shelf: {sys.executable} {path}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, path], check=False, capture_output=True, text=True,
                              timeout=OFFTHESHELF_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # keep the lines it printed; the rest of the run goes on
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        proc = subprocess.CompletedProcess(e.cmd, -1, out, f"timed out after {e.timeout} s")
    found = {}
    for line in proc.stdout.splitlines():
        log(setup, f"  | {line}")
        m = ANCHOR_LINE.match(line)
        if m:
            found[m.group("name").strip()] = float(m.group("tps"))
    if proc.returncode != 0:
        log(setup, f"  off-the-shelf exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}")
    log(setup, f"  ({time.perf_counter() - t0:.0f} s)")
    return found


def table(results: list[Result], anchor: dict[str, float], setup: Setup) -> None:
    variants = ["fwd+bwd", *(f"fwd+bwd without {k}" for k in setup.ablate), "fwd+bwd bf16 weights", "step",
                "step foreach AdamW", "step, CUDA graph", "step, master weights",
                "step, master weights, CUDA graph", "fwd+bwd compiled", "step compiled"]
    log(setup, "\n| model | params total / active | check | variant | ms | tokens/s | 6N-MFU | peak GB | ours / off-the-shelf |")
    log(setup, "|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ok = r.check.get("kernels_match") and r.check.get("loss_falls") and r.check.get("cuda_graph_matches_eager", True) \
            and r.check.get("master_weights_match_eager", True)
        other = anchor.get(MODELS[r.name][1] or "")
        for v in variants:
            if v not in r.variants:
                continue
            row = r.variants[v]
            mem = f"{row['peak_mem_gb']:.1f}" if row["peak_mem_gb"] is not None else "-"
            ratio = f"{row['tokens_per_s'] / other:.2f}" if other else "-"
            log(setup, f"| {r.name} | {millions(r.params_total)} / {millions(r.params_active)} | "
                       f"{'ok' if ok else 'FAILED'} | {v} | {row['ms']:.1f} | {row['tokens_per_s']:,.0f} | "
                       f"{100 * row['mfu_6n']:.1f}% | {mem} | {ratio} |")
        for note in r.notes:
            log(setup, f"  {r.name}: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {', '.join(MODELS)}, in the order the compiled variants follow")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, no compile, a few steps")
    ap.add_argument("--mixer-backend", default="auto", choices=("auto", "triton", "mamba_ssm"),
                    help="mixer.backend of the Mamba models (auto: the platform's choice; triton: ours only)")
    ap.add_argument("--offtheshelf", metavar="PATH", help="run this anchor script after ours and print the ratios")
    ap.add_argument("--ablate", default="", metavar="KERNELS",
                    help=f"also time the fwd+bwd with each of these kernels on its PyTorch twin, one at a time "
                         f"(comma-separated, or 'all': {', '.join(KERNELS)})")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="no compile variant starts once the run has taken this many seconds (default 170)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    args.ablate = KERNELS if args.ablate == "all" else tuple(k for k in args.ablate.split(",") if k)
    unknown = [k for k in args.ablate if k not in KERNELS]
    if unknown:
        ap.error(f"unknown kernel(s) in --ablate: {', '.join(unknown)}; valid: {', '.join(KERNELS)} or all")
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    out = os.environ.get("OUT")
    log_file = Path(out) / "bench_train.log" if out else None
    if log_file is not None:
        log_file.write_text("")
    if args.smoke:
        return Setup(torch.device("cpu"), 2, 32, (1, 16), warmup=0, reps=1, compile=False, smoke=True,
                     ablate=args.ablate, log_file=log_file)
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU (or --smoke for the CPU path)")
    return Setup(torch.device("cuda"), 8, 2048, (1, 512), warmup=2, reps=5, compile=not args.no_compile,
                 smoke=False, mixer_backend=args.mixer_backend, ablate=args.ablate, log_file=log_file)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    setup = make_setup(args)
    _quiet()
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if setup.device.type == "cuda" else torch.float32
    setup.peak = matmul_peak_flops(setup.device, dtype)
    name = torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu"
    log(setup, f"{name}, torch {torch.__version__}; dense {dtype} matmul {setup.peak / 1e12:.3g} TFLOP/s (6N-MFU "
               f"denominator); B {setup.batch} x L {setup.seq_len}")
    results = bench_all_eager(args.models.split(","), setup)
    # the anchor before the compile variants: the comparison matters more than compiling if time runs short
    anchor = run_offtheshelf(args.offtheshelf, setup) if args.offtheshelf else {}
    if setup.compile:
        report(results, anchor, setup, name)  # the eager table, in case the compile variants outrun the run
        bench_all_compiled(results, setup, t0, args.budget_s)
    report(results, anchor, setup, name)
    log(setup, f"total {time.perf_counter() - t0:.0f} s")
    return results


def report(results: list[Result], anchor: dict[str, float], setup: Setup, device: str) -> None:
    table(results, anchor, setup)
    if os.environ.get("OUT"):
        payload = {"device": device, "torch": torch.__version__, "peak_flops": setup.peak, "batch": setup.batch,
                   "seq_len": setup.seq_len, "offtheshelf_tokens_per_s": anchor,
                   "models": [r.__dict__ for r in results]}
        Path(os.environ["OUT"], "bench_train.json").write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
