"""Checkpoints: verified, written atomically with the previous one kept, loaded with weights_only=True.

Layout of a run: <out_dir>/runs/<mlflow run id>/{config.yaml, checkpoints/{last,prev,best}.ckpt}.

Writing: a checkpoint goes to <name>.tmp, is flushed to disk (fsync), and is renamed over <name>; before the
rename, the last.ckpt it replaces is renamed to prev.ckpt. So at every moment the newest complete checkpoint
is last.ckpt (or prev.ckpt, if the process died between the two renames), and a kill, a crash or a full disk
in the middle of a write leaves the previous file as it was.

Verifying: every file ends with a trailer, MAGIC + the SHA-256 of the bytes before it, after the zip archive
that torch.save writes (torch.load ignores bytes after the archive, so the files stay plain PyTorch
checkpoints). load_checkpoint checks it: a truncated or damaged file is reported with its name instead of
being loaded with wrong weights, and resuming falls back to prev.ckpt (see recover_checkpoint).

Loading never runs code from the file: torch.load(weights_only=True) unpickles only tensors, containers and
plain values, and refuses anything else.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

MAGIC = b"BMLABSHA"  # then 32 bytes of SHA-256
TRAILER = len(MAGIC) + 32
LAST, PREV, BEST = "last.ckpt", "prev.ckpt", "best.ckpt"
REQUIRED_KEYS = ("state_dict", "run_config", "global_step")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, not one of ours, or cannot be written."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class _HashingWriter:
    """A binary file that also feeds what it writes to a SHA-256 (torch.save writes through it)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_checkpoint(checkpoint: dict[str, Any], path: Path, previous: Path | None = None) -> None:
    """torch.save `checkpoint` to `path` with its SHA-256 trailer, atomically; with `previous`, the file that
    `path` held is renamed there first. A failure (a full disk, say) raises CheckpointError and leaves both
    files as they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(checkpoint, writer)
            f.write(MAGIC + writer.sha.digest())
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except Exception as e:  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        tmp.unlink(missing_ok=True)
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {cause.strerror or cause}; the previous "
                              "checkpoint is kept") from None
    _fsync_dir(path.parent)


def verify(path: Path) -> bool:
    """Check the SHA-256 trailer: True if it matches, False if the file has none (written elsewhere);
    CheckpointError if it does not match."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < TRAILER:
            return False
        f.seek(size - TRAILER)
        trailer = f.read(TRAILER)
        if not trailer.startswith(MAGIC):
            return False
        f.seek(0)
        sha, left = hashlib.sha256(), size - TRAILER
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.digest() != trailer[len(MAGIC):]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its bytes do not match the SHA-256 written with it "
                              "(a damaged or partly overwritten file)")
    return True


def load_checkpoint(path: str | Path) -> dict:
    """Verify and torch.load(weights_only=True) a checkpoint; every failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        verify(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"checkpoint {path} is corrupt: {str(e).splitlines()[0]}") from None
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(f"checkpoint {path} is refused: it holds pickled objects that are not tensors or plain "
                              f"values, which could run code when loaded ({what})") from None
    except Exception as e:  # truncated zip, garbage bytes, an unreadable file
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a tensor checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} was not written by this platform (it lacks {', '.join(REQUIRED_KEYS)})")
    return ckpt


def find_run_dir(out_dir: str | Path, resume: str) -> Path:
    """The run directory that `resume=` names: 'last' (or true) is the run whose checkpoint is newest."""
    root = Path(out_dir) / "runs"
    runs = sorted({p.parent.parent for name in (LAST, PREV) for p in root.glob(f"*/checkpoints/{name}")})
    if str(resume).lower() in ("last", "true"):
        if not runs:
            raise CheckpointError(f"resume={resume}: no run with a checkpoint under {root}")
        return max(runs, key=lambda r: max(p.stat().st_mtime for p in (r / "checkpoints").glob("*.ckpt")))
    run_dir = root / str(resume)
    if run_dir not in runs:
        known = ", ".join(r.name for r in runs) or "none"
        raise CheckpointError(f"resume={resume}: no checkpoint at {run_dir}/checkpoints/{LAST} "
                              f"(runs with checkpoints: {known})")
    return run_dir


def recover_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The newest good checkpoint of a run: last.ckpt, else prev.ckpt. A file that fails to load is
    renamed to <name>.corrupt (kept for a look, and never rotated into prev.ckpt) with a one-line warning."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    problems = []
    for name in (LAST, PREV):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            aside = path.with_name(name + ".corrupt")
            os.replace(path, aside)
            problems.append(f"{e} (moved to {aside.name})")
            print(f"warning: {problems[-1]}", file=sys.stderr)
            continue
        if name != LAST:
            why = "" if problems else f" ({LAST} is missing: the process stopped between two renames)"
            print(f"warning: resuming from {path} (step {ckpt['global_step']}){why}", file=sys.stderr)
        return path, ckpt
    raise CheckpointError(f"no loadable checkpoint in {ckpt_dir}: " + ("; ".join(problems) or "none written"))


class VerifiedCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through write_checkpoint and load_checkpoint. `preloaded` is a checkpoint
    already loaded (and verified) from `preloaded_path`, handed to the trainer without reading it again."""

    def __init__(self, preloaded_path: Path | None = None, preloaded: dict | None = None):
        self.preloaded_path, self.preloaded = preloaded_path, preloaded

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_checkpoint(checkpoint, Path(path), (storage_options or {}).get("previous"))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if self.preloaded is not None and Path(path) == self.preloaded_path:
            ckpt, self.preloaded = self.preloaded, None
            return ckpt
        return load_checkpoint(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


class RunCheckpoints(Callback):
    """Saves last.ckpt (the one before it kept as prev.ckpt) after every validation, when training ends, and
    when Lightning stops the run on SIGTERM (SIGTERMException, raised between steps); best.ckpt when
    val/loss improves. Stops at stop_at_step. Leftover *.tmp files of a killed process are removed at start."""

    def __init__(self, ckpt_dir: Path, stop_at_step: int | None = None):
        self.dir = Path(ckpt_dir)
        self.stop_at_step = stop_at_step
        self.best = float("inf")
        self._last_step: int | None = None  # the step last.ckpt was written at by this process
        self.interrupted_at: int | None = None  # after a SIGTERM stop: the step of the newest last.ckpt

    @property
    def last_path(self) -> Path:
        return self.dir / LAST

    @property
    def prev_path(self) -> Path:
        return self.dir / PREV

    @property
    def best_path(self) -> Path:
        return self.dir / BEST

    def save_last(self, trainer: L.Trainer) -> None:
        # a second save at the same step (validation, then the end of training) replaces last.ckpt only, so
        # that prev.ckpt stays one checkpoint older
        step = trainer.global_step
        previous = None if self._last_step == step else self.prev_path
        trainer.save_checkpoint(self.last_path, weights_only=False, storage_options={"previous": previous})
        self._last_step = step

    def on_train_start(self, trainer, pl_module):
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        self.save_last(trainer)
        if val is not None and float(val) < self.best:
            self.best = float(val)
            trainer.save_checkpoint(self.best_path, weights_only=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        self.save_last(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        # Raised between training steps, the state is whole; raised between validation batches, a checkpoint
        # would resume after a validation that never finished (no val metrics, no best.ckpt for that step),
        # so the previous one stays the newest and resuming runs that validation again.
        if not trainer.validating:
            self.save_last(trainer)
        self.interrupted_at = self._last_step

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state_dict):
        self.best = state_dict["best"]
