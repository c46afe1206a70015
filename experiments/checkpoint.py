"""Checkpoints: written atomically (temporary file + rename), loaded with weights_only=True.

Layout of a run: <out_dir>/runs/<mlflow run id>/{config.yaml, checkpoints/last.ckpt, checkpoints/best.ckpt}.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or not one of ours."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_atomic(trainer: L.Trainer, path: Path) -> None:
    """Write trainer state to `path` so that a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    os.replace(tmp, path)


def find_run_dir(out_dir: str | Path, resume: str) -> Path:
    """The run directory that `resume=` names: 'last' (or true) is the run with the newest last.ckpt."""
    root = Path(out_dir) / "runs"
    if str(resume).lower() in ("last", "true"):
        ckpts = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not ckpts:
            raise CheckpointError(f"resume={resume}: no run with a checkpoint under {root}")
        return ckpts[-1].parent.parent
    run_dir = root / str(resume)
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        known = ", ".join(p.parent.parent.name for p in root.glob("*/checkpoints/last.ckpt")) or "none"
        raise CheckpointError(f"resume={resume}: no checkpoint at {run_dir}/checkpoints/last.ckpt (runs with checkpoints: {known})")
    return run_dir


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True, turning every failure into a message that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled code refused by weights_only
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a tensor checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "run_config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} was not written by this platform (no state_dict/run_config)")
    return ckpt


class RunCheckpoints(Callback):
    """Saves last.ckpt after every validation and best.ckpt when val/loss improves; stops at stop_at_step."""

    def __init__(self, ckpt_dir: Path, stop_at_step: int | None = None):
        self.dir = Path(ckpt_dir)
        self.stop_at_step = stop_at_step
        self.best = float("inf")

    @property
    def last_path(self) -> Path:
        return self.dir / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.ckpt"

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        save_atomic(trainer, self.last_path)
        if val is not None and float(val) < self.best:
            self.best = float(val)
            save_atomic(trainer, self.best_path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        save_atomic(trainer, self.last_path)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state_dict):
        self.best = state_dict["best"]
