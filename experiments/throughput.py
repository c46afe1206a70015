"""Tokens per second and model FLOP utilisation, against a matmul peak measured in the same process."""
from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback


@torch.no_grad()
def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved FLOP/s of a large square matmul on `device` (the denominator of MFU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class Throughput(Callback):
    """Logs train/tokens_per_s and train/mfu (training FLOPs from blocks.accounting / measured peak)."""

    def __init__(self, tokens_per_step: int, train_flops_per_token: float, log_every: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = train_flops_per_token
        self.log_every = max(1, log_every)
        self.peak = None
        self._t0 = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module):
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self.peak = matmul_peak_flops(pl_module.device, dtype)
        pl_module.print(f"matmul peak on {pl_module.device.type} ({dtype}): {self.peak / 1e12:.2f} TFLOP/s")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self._t0 is None or step - self._step0 >= self.log_every:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self._t0 is not None:
                tps = (step - self._step0) * self.tokens_per_step / (now - self._t0)
                pl_module.log("train/tokens_per_s", tps, prog_bar=True)
                pl_module.log("train/mfu", tps * self.flops_per_token / self.peak)
            self._t0, self._step0 = now, step

    def on_train_end(self, trainer, pl_module):
        # the totals a scaling analysis needs: tokens seen and training FLOPs spent (from blocks.accounting)
        if trainer.logger is not None:
            tokens = trainer.global_step * self.tokens_per_step
            trainer.logger.log_metrics(
                {"train/tokens_total": tokens, "train/flops_total": tokens * self.flops_per_token}, step=trainer.global_step
            )

    def on_validation_end(self, trainer, pl_module):
        self._t0 = None  # time spent validating is not training throughput: start a new window
