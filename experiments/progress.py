"""Readable console output: one progress bar for training, one line per validation."""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class TrainBar(TQDMProgressBar):
    """Lightning's bar without the per-validation bars (validation prints one line instead) or v_num."""

    def init_validation_tqdm(self):
        return Tqdm(disable=True)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ValidationReport(Callback):
    """After each validation: logs val/* and moe/* metrics at step = global_step, and prints
    `step N | train/loss .. | val/loss .. | val/bpb .. | tokens/s ..`."""

    KEYS = ("train/loss", "val/loss", "val/bpb", "val/bits_per_token", "train/tokens_per_s")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if trainer.logger is not None:
            logged = {k: float(v) for k, v in m.items() if k.startswith(("val/", "moe/"))}
            trainer.logger.log_metrics(logged, step=trainer.global_step)
        parts = [f"{k.split('/')[-1] if k.startswith('train/tok') else k} {float(m[k]):.4g}" for k in self.KEYS if k in m]
        line = f"step {trainer.global_step:>6} | " + " | ".join(parts)
        bar = next((c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)), None)
        if bar is not None and bar.is_enabled and bar.train_progress_bar is not None:
            bar.train_progress_bar.write(line)
        else:
            pl_module.print(line)
