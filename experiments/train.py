"""The training entry point that run.py (and sweeps) call: config in, trained run and metrics out."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.checkpoint import CheckpointError, RunCheckpoints, atomic_write_text, find_run_dir, load_checkpoint
from experiments.config import ConfigError
from experiments.data import DataConfig, TokenDataModule
from experiments.module import LMModule
from experiments.progress import TrainBar, ValidationReport
from experiments.throughput import Throughput
from experiments.tracking import make_logger


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    metrics: dict[str, float]


def _quiet() -> None:
    """Silence start-up chatter that says nothing about this run."""
    import mlflow  # noqa: F401  (configures its loggers on import; quiet them after)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric",
                 "mlflow", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LeafSpec.*",
                    ".*checkpoint.*iterable.*", ".*lightning-cloud.*", ".*litlogger.*", ".*Starting from v1.9.0.*"):
        warnings.filterwarnings("ignore", message=pattern)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'model': {'d_model': 128}} -> {'model.d_model': 128}: the same keys the command line uses."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _precision(cfg: DictConfig, accelerator: str) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if accelerator == "cuda" else "32-true"


def _make_trainer(cfg: DictConfig, accelerator: str, logger, callbacks: list[Callback]) -> L.Trainer:
    accumulate = cfg.trainer.accumulate_grad_batches
    return L.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        precision=_precision(cfg, accelerator),
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_every * accumulate,  # counted in batches, so x accumulation
        check_val_every_n_epoch=None,  # the train stream is endless: validate by step count only
        limit_val_batches=cfg.data.val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.trainer.grad_clip or None,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=cfg.trainer.log_every,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # RunCheckpoints writes last/best atomically instead
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.progress_bar,
    )


def train(cfg: DictConfig, callbacks: Sequence[Callback] = (), tags: dict[str, str] | None = None) -> RunResult:
    """Train the model `cfg` describes, tracked in MLflow; resume if cfg.resume is set.

    `callbacks` are added to the trainer (a sweep adds its pruning reporter); `tags` to the MLflow run
    (a sweep sets mlflow.parentRunId to nest the trial under its study's run).

    Every check of the config, data and checkpoint happens before the first step, and a problem
    found there is raised as ConfigError (or CheckpointError) with a message for the user.
    """
    _quiet()
    L.seed_everything(cfg.seed, verbose=False)
    try:
        resume_dir = find_run_dir(cfg.out_dir, cfg.resume) if cfg.resume else None
        last_ckpt = resume_dir / "checkpoints" / "last.ckpt" if resume_dir else None
        start_step = load_checkpoint(last_ckpt)["global_step"] if last_ckpt else 0
        data = TokenDataModule(DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)))
        data.setup("fit")  # fail on bad data now, before building anything else
        module = LMModule(cfg, data.vocab_size, data.bytes_per_token)
    except CheckpointError:
        raise
    except (ValueError, ImportError) as e:  # bad config or data, or a missing optional package
        raise ConfigError(str(e)) from None
    accumulate = cfg.trainer.accumulate_grad_batches
    data.set_start_batch(start_step * accumulate)

    accelerator = "cuda" if cfg.trainer.accelerator == "auto" and torch.cuda.is_available() else cfg.trainer.accelerator
    accelerator = "cpu" if accelerator == "auto" else accelerator
    logger = make_logger(cfg, run_id=resume_dir.name if resume_dir else None, extra_tags=tags)
    run_id = logger.run_id
    try:
        run_dir = Path(cfg.out_dir) / "runs" / run_id
        ckpt_dir = run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        client = logger.experiment
        if not resume_dir:
            logger.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)))
            acc = module.accounting
            for key, value in (("params_total", acc.total_params), ("params_active", acc.active_params),
                               ("train_flops_per_token", acc.train_flops_per_token)):
                client.log_param(run_id, key, value)
        client.log_artifact(run_id, str(run_dir / "config.yaml"))
        client.set_tag(run_id, "checkpoint_dir", str(ckpt_dir.resolve()))
        client.set_tag(run_id, "data", data.describe())

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * accumulate
        callbacks = [
            *callbacks,
            RunCheckpoints(ckpt_dir, cfg.trainer.stop_at_step),
            Throughput(tokens_per_step, module.accounting.train_flops_per_token, cfg.trainer.log_every),
            ValidationReport(),
        ]
        if cfg.trainer.progress_bar:
            callbacks.append(TrainBar(refresh_rate=max(1, cfg.trainer.log_every // 2)))
        trainer = _make_trainer(cfg, accelerator, logger, callbacks)
        print(f"run {run_id}: {module.accounting.summary()}")
        print(f"data: {data.describe()}")
        if cfg.trainer.compile:
            module.model = torch.compile(module.model)
        trainer.fit(module, datamodule=data, ckpt_path=last_ckpt, weights_only=True)
    except BaseException:
        # whatever stopped the run before Lightning could finalize it, MLflow must not show it RUNNING
        if logger.experiment.get_run(run_id).info.status == "RUNNING":
            logger.experiment.set_terminated(run_id, "FAILED")
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    print(f"run {run_id} done at step {trainer.global_step}: " + ", ".join(
        f"{k} {metrics[k]:.4f}" for k in ("train/loss", "val/loss", "val/bpb") if k in metrics))
    print(f"checkpoints: {ckpt_dir}")
    return RunResult(run_id, run_dir, metrics)
