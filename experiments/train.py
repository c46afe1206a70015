"""The training entry point that run.py (and sweeps) call: config in, trained run and metrics out.

Stopping: SIGTERM (and the first Ctrl-C, which is handled the same way) ends the run after the current step
(Lightning's SIGTERM handling raises SIGTERMException between steps; RunCheckpoints saves last.ckpt on it),
the MLflow run ends KILLED and train() raises Interrupted. A second Ctrl-C stops at once, without a new
checkpoint. SIGKILL cannot be caught: resume=<run id> continues from the last complete checkpoint.

Several processes (trainer.devices x trainer.num_nodes, or torchrun / SLURM: docs/distributed.md): every rank
runs train(); only rank 0 opens the MLflow run, writes the config and checkpoints (Lightning's strategies save
on rank 0 only; every rank takes part in gathering the state) and prints. The other ranks return a RunResult
with run_id None.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from experiments.checkpoint import (CheckpointError, RunCheckpoints, VerifiedCheckpointIO, atomic_write_text,
                                    find_run_dir, recover_checkpoint)
from experiments.config import ConfigError, check_master_weights
from experiments.data import DataConfig, TokenDataModule
from experiments.distributed import check_parallel, make_strategy
from experiments.module import LMModule
from experiments.plugins import record_plugins
from experiments.progress import TrainBar, ValidationReport
from experiments.throughput import Throughput
from experiments.tracking import close_if_orphaned, make_logger, open_store, owner_alive, tracking_uri


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    metrics: dict[str, float]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped a run; its MLflow run ended KILLED. `step` is the step last.ckpt holds."""

    def __init__(self, signal_name: str, run_id: str, step: int | None, checkpoint: Path):
        self.signal_name, self.run_id, self.step, self.checkpoint = signal_name, run_id, step, checkpoint
        self.exit_code = 128 + (signal.SIGTERM if signal_name == "SIGTERM" else signal.SIGINT)
        saved = f"checkpoint at step {step} in {checkpoint}" if step is not None else "no new checkpoint"
        super().__init__(f"{signal_name}: run {run_id} stopped ({saved}); continue it with "
                         f"python run.py resume={run_id}")


class CtrlC(Callback):
    """During training, the first Ctrl-C does what SIGTERM does (stop after this step, with a checkpoint):
    it calls the SIGTERM handler that Lightning installed. A second one raises KeyboardInterrupt at once.
    Lightning puts the original SIGINT handler back when fit ends."""

    def __init__(self):
        self.pressed = 0

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.pressed += 1
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if self.pressed > 1 or not callable(on_sigterm):
            raise KeyboardInterrupt
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)
        on_sigterm(signal.SIGTERM, frame)


def _quiet() -> None:
    """Silence start-up chatter that says nothing about this run."""
    import mlflow  # noqa: F401  (configures its loggers on import; quiet them after)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric",
                 "lightning.pytorch.trainer.connectors.signal_connector",
                 "mlflow", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LeafSpec.*",
                    ".*checkpoint.*iterable.*", ".*lightning-cloud.*", ".*litlogger.*", ".*Starting from v1.9.0.*",
                    # MoE statistics are summed over ranks before they are logged (experiments.distributed)
                    r"It is recommended to use `self.log\('moe/"):
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


def _accelerator(cfg: DictConfig) -> str:
    if cfg.trainer.accelerator != "auto":
        return cfg.trainer.accelerator
    return "cuda" if torch.cuda.is_available() else "cpu"


def _make_trainer(cfg: DictConfig, accelerator: str, logger, callbacks: list[Callback],
                  checkpoint_io: VerifiedCheckpointIO | None = None) -> L.Trainer:
    accumulate = cfg.trainer.accumulate_grad_batches
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    return L.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=make_strategy(cfg.trainer.strategy, accelerator, world, cfg.moe.expert_parallel,
                               _precision(cfg, accelerator)),
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
        plugins=[checkpoint_io or VerifiedCheckpointIO()],
    )


def _global_rank(trainer: L.Trainer) -> int:
    """This process's rank, known before fit: from torchrun's or SLURM's environment, or, for the processes that
    Lightning's own launcher starts, from LOCAL_RANK and NODE_RANK (which set_world_ranks reads)."""
    strategy = trainer.strategy
    if hasattr(strategy, "set_world_ranks"):
        strategy.set_world_ranks()
    return trainer.global_rank


def _claim_resumed_run(cfg: DictConfig, run_id: str) -> None:
    """Refuse to resume a run that a live process is training; close one left RUNNING by a dead process."""
    client = open_store(tracking_uri(cfg))
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"resume={run_id}: the run has checkpoints under {cfg.out_dir} but is not in the "
                          f"MLflow store {tracking_uri(cfg)}") from None
    if run.info.status == "RUNNING" and owner_alive(run):
        tags = run.data.tags
        raise ConfigError(f"run {run_id} is being trained by process {tags['process.pid']} on this machine; "
                          "stop it first (or wait for it to end)")
    if close_if_orphaned(client, run):
        print(f"note: run {run_id} was left RUNNING by process {run.data.tags['process.pid']}, which is gone; "
              "continuing it from its last checkpoint", file=sys.stderr)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = (), tags: dict[str, str] | None = None) -> RunResult:
    """Train the model `cfg` describes, tracked in MLflow; resume if cfg.resume is set.

    `callbacks` are added to the trainer (a sweep adds its pruning reporter); `tags` to the MLflow run
    (a sweep sets mlflow.parentRunId to nest the trial under its study's run).

    Every check of the config, data and checkpoint happens before the first step, and a problem
    found there is raised as ConfigError (or CheckpointError) with a message for the user.
    """
    _quiet()
    L.seed_everything(cfg.seed, verbose=False)  # the same seed on every rank: the same initial weights
    accelerator = _accelerator(cfg)
    if cfg.optim.get("master_weights", False):
        try:
            check_master_weights(_precision(cfg, accelerator), cfg.trainer.accumulate_grad_batches,
                                 cfg.trainer.strategy)
        except ValueError as e:  # compose checked the rest: here precision=auto resolved without a GPU
            why = " (trainer.precision=auto is 32-true without a GPU)" if cfg.trainer.precision == "auto" else ""
            raise ConfigError(f"{e}{why}") from None
    if cfg.trainer.cuda_graph and accelerator not in ("cuda", "gpu"):
        raise ConfigError("trainer.cuda_graph=true replays the training step from a CUDA graph and needs a CUDA GPU; "
                          "this machine has none (set trainer.cuda_graph=false)")
    try:
        # a device, precision or strategy that Lightning refuses, before any run
        probe = _make_trainer(cfg, accelerator, False, [])
        check_parallel(cfg.trainer.strategy, probe.world_size, cfg.moe.expert_parallel)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator}, trainer.devices={cfg.trainer.devices}, "
                          f"trainer.num_nodes={cfg.trainer.num_nodes}, trainer.strategy={cfg.trainer.strategy}, "
                          f"trainer.precision={cfg.trainer.precision}: {str(e).splitlines()[0]}") from None
    rank = _global_rank(probe)
    try:
        resume_dir = find_run_dir(cfg.out_dir, cfg.resume) if cfg.resume else None
        if resume_dir and rank == 0:
            _claim_resumed_run(cfg, resume_dir.name)
        ckpt_path, ckpt = recover_checkpoint(resume_dir) if resume_dir else (None, None)
        start_step = ckpt["global_step"] if ckpt else 0
        data = TokenDataModule(DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)))
        data.setup("fit")  # fail on bad data now, before building anything else
        module = LMModule(cfg, data.vocab_size, data.bytes_per_token)
    except CheckpointError:
        raise
    except (ValueError, ImportError) as e:  # bad config or data, or a missing optional package
        raise ConfigError(str(e)) from None
    accumulate = cfg.trainer.accumulate_grad_batches
    data.set_start_batch(start_step * accumulate)
    if rank != 0:
        return _train_other_rank(cfg, module, data, callbacks, ckpt_path, ckpt)

    logger = make_logger(cfg, run_id=resume_dir.name if resume_dir else None, extra_tags=tags)
    run_id = logger.run_id
    checkpoints = RunCheckpoints(Path(cfg.out_dir) / "runs" / run_id / "checkpoints", cfg.trainer.stop_at_step)
    ctrl_c = CtrlC()
    try:
        run_dir = Path(cfg.out_dir) / "runs" / run_id
        ckpt_dir = run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        client = logger.experiment
        record_plugins(run_dir, client, run_id)  # resuming or loading this run later needs the same files
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
        callbacks = [  # ValidationReport before RunCheckpoints: a validation is logged before its checkpoint exists
            *callbacks,
            ValidationReport(),
            checkpoints,
            ctrl_c,
            Throughput(tokens_per_step, module.accounting.train_flops_per_token, cfg.trainer.log_every),
        ]
        if cfg.trainer.progress_bar:
            callbacks.append(TrainBar(refresh_rate=max(1, cfg.trainer.log_every // 2)))
        trainer = _make_trainer(cfg, accelerator, logger, callbacks, VerifiedCheckpointIO(ckpt_path, ckpt))
        print(f"run {run_id}: {module.accounting.summary()}")
        print(f"data: {data.describe()}")
        if cfg.trainer.compile:
            module.model = torch.compile(module.model)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as e:
        # whatever stopped the run, MLflow must not show it RUNNING: KILLED for a signal, else FAILED
        # (Lightning turns a KeyboardInterrupt it catches into SystemExit(1))
        signalled = isinstance(e, (SIGTERMException, KeyboardInterrupt)) or (
            isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt))
        logger.experiment.set_terminated(run_id, "KILLED" if signalled else "FAILED")
        if signalled:
            name = "SIGINT" if ctrl_c.pressed or not isinstance(e, SIGTERMException) else "SIGTERM"
            raise Interrupted(name, run_id, checkpoints.interrupted_at, checkpoints.last_path) from None
        raise
    if module.nonfinite_stop:
        logger.experiment.set_terminated(run_id, "FAILED")
        logger.experiment.set_tag(run_id, "end_reason", module.nonfinite_stop)
        raise FloatingPointError(module.nonfinite_stop)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    print(f"run {run_id} done at step {trainer.global_step}: " + ", ".join(
        f"{k} {metrics[k]:.4f}" for k in ("train/loss", "val/loss", "val/bpb") if k in metrics))
    print(f"checkpoints: {ckpt_dir}")
    return RunResult(run_id, run_dir, metrics)


def _train_other_rank(cfg: DictConfig, module: LMModule, data: TokenDataModule, callbacks: Sequence[Callback],
                      ckpt_path: Path | None, ckpt: dict | None) -> RunResult:
    """A rank other than 0: the same training (and the same collective calls: checkpoints are gathered on
    every rank) with no logger, no run folder and no output; rank 0 reports the run."""
    unwritten = Path(cfg.out_dir) / "runs" / "rank0-run" / "checkpoints"  # save_checkpoint writes on rank 0 only
    callbacks = [*callbacks, RunCheckpoints(unwritten, cfg.trainer.stop_at_step)]
    cfg_quiet = cfg.copy()
    cfg_quiet.trainer.progress_bar = False
    trainer = _make_trainer(cfg_quiet, _accelerator(cfg), False, callbacks, VerifiedCheckpointIO(ckpt_path, ckpt))
    if cfg.trainer.compile:
        module.model = torch.compile(module.model)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    if module.nonfinite_stop:
        raise FloatingPointError(module.nonfinite_stop)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return RunResult(None, None, metrics)
