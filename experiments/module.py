"""The LightningModule: next-token loss plus the routers' auxiliary losses, AdamW, warmup + cosine."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from blocks.accounting import account
from blocks.expert_parallel import sync_expert_grads
from blocks.model import next_token_loss
from experiments import distributed
from experiments.build import build_model
from experiments.config import FUSED_WITH_SCALER
from experiments.master_adamw import MasterAdamW
from experiments.train_graph import TrainGraph
from experiments.utilization import moe_layers, record_routing, save_snapshot, snapshot_arrays, snapshot_path

LN2 = math.log(2)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps (and flat after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_fused(impl: str, params: list[torch.Tensor], precision: str) -> bool:
    """Whether AdamW runs fused (optim.impl). Fused AdamW unscales gradients inside its own step, so it cannot
    follow a GradScaler's unscale-then-clip (trainer.precision=16-mixed); auto also wants every weight on a GPU,
    where one kernel per step beats the multi-tensor path (on the CPU it brings nothing)."""
    scaler = precision in ("16-mixed", "16")  # Lightning runs a GradScaler for these alone
    if impl == "fused":
        if scaler:
            raise ValueError(FUSED_WITH_SCALER)
        return True
    if impl == "foreach":
        return False
    return not scaler and bool(params) and all(p.is_cuda for p in params)


class LMModule(L.LightningModule):
    """Trains `build_model(cfg)`; logs loss, bits per byte, learning rate, aux losses and expert load."""

    def __init__(self, cfg: DictConfig, vocab_size: int, bytes_per_token: float | None = 1.0):
        super().__init__()
        self.cfg = cfg
        self.bytes_per_token = bytes_per_token
        self.model = build_model(cfg, vocab_size)
        self.accounting = account(self.model, cfg.data.seq_len)
        self.moe_layers = moe_layers(self.model)
        for moe in self.moe_layers.values():
            moe.track_tokens(vocab_size)  # token id -> expert counts, fed by observe_tokens in training
        self._val_routing: tuple = (None, {})  # (token ids, layer -> expert ids) of the first val batch
        self._loss: torch.Tensor | None = None  # the last training loss, for the finiteness check
        self._grad_norm: torch.Tensor | None = None  # the step's gradient norm before clipping
        self._adamw_impl: dict | None = None  # AdamW's fused/foreach flags, set by configure_optimizers
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.nonfinite_stop: str | None = None  # why the run stopped, when non-finite steps stopped it
        self.expert_groups = None  # the expert-parallel process groups, once setup() has sharded the experts
        # trainer.cuda_graph: the training fwd+bwd replayed from a CUDA graph after a few eager steps
        self.train_graph = TrainGraph() if cfg.trainer.get("cuda_graph", False) else None
        self._graph_ran = False  # this step's backward already ran inside the replayed graph
        self._fp32_init: dict | None = None  # optim.master_weights: the weights' fp32 values before their cast

    def setup(self, stage: str) -> None:
        """In a distributed run (torch.distributed is up, DDP has not wrapped the module yet): shard the experts
        for moe.expert_parallel > 1 and keep per-rank state out of DDP's synchronisation (experiments.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.expert_groups is None:
            self.expert_groups = distributed.setup_module(self, self.model, self.cfg.moe.expert_parallel)
        if stage == "fit" and self.cfg.optim.get("master_weights", False):
            self.cast_to_master_weights()

    def cast_to_master_weights(self) -> None:
        """optim.master_weights: store every parameter in bf16 (buffers such as the utilization counters stay
        as they are), before DDP wraps the module and the weights move to the GPU; their fp32 values seed the
        optimizer's masters (experiments/master_adamw.py). A resumed run takes its masters from the checkpoint."""
        if self._fp32_init is not None or all(p.dtype == torch.bfloat16 for p in self.parameters()):
            return
        self._fp32_init = {p: p.detach().clone() for p in self.parameters()}
        for p in self.parameters():
            p.data = p.data.to(torch.bfloat16)

    def log_bits(self, split: str, loss_nats: torch.Tensor, **kwargs) -> None:
        """Bits per byte, comparable across tokenizers; bits per token when the data cannot tell bytes."""
        if self.bytes_per_token:
            self.log(f"{split}/bpb", loss_nats / LN2 / self.bytes_per_token, **kwargs)
        else:
            self.log(f"{split}/bits_per_token", loss_nats / LN2, **kwargs)

    def _lm_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_BL, y_BL = batch
        if self.training:
            for moe in self.moe_layers.values():
                moe.observe_tokens(x_BL)
        logits_BLV, aux = self.model(x_BL)
        return next_token_loss(logits_BLV, y_BL), aux

    def _forward_loss(self, batch):
        lm_loss, aux = self._lm_loss(batch)
        return lm_loss, aux, (lm_loss + sum(aux.values()) if aux else lm_loss)

    def training_step(self, batch, batch_idx):
        out = self.train_graph.run(self, self._forward_loss, batch) if self.train_graph is not None else None
        if out is None:
            lm_loss, aux, loss = self._forward_loss(batch)
        else:  # replayed: the gradients are on the parameters already
            lm_loss, aux, loss = out
            self._graph_ran = True
            if self.train_graph.calls == self.train_graph.warmup_steps + 1:
                self.print(f"trainer.cuda_graph: the training step is captured after {self.train_graph.warmup_steps} "
                           "eager steps and replayed from now on")
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log_bits("train", lm_loss)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        for name, value in aux.items():
            self.log(f"train/aux_{name}", value)
        self._loss = loss.detach()
        return loss

    def backward(self, loss, *args, **kwargs):
        if self._graph_ran:  # the replayed graph ran this step's backward; zero_grad has run since
            self._graph_ran = False
            self.train_graph.attach_grads()
            return
        super().backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer):
        """Skip the update if the loss or any gradient is not finite; stop after trainer.nonfinite_stop_after
        such steps in a row (the trainer ends the run with a checkpoint, and train() reports why).

        Skipping drops every gradient, so AdamW leaves the weights and its moments alone, while the step counter,
        the schedule and the data stream go on. The check reads one scalar on the host per step (a GPU waits for
        it, as it does for a GradScaler); it runs before gradient clipping, which would hide an inf in a NaN."""
        if self.expert_groups is not None:  # the expert gradients, summed over the ranks holding the same experts
            sync_expert_grads(self, self.expert_groups)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # the whole gradient's L2 norm from one multi-tensor kernel (a loop would launch one kernel per
        # parameter); single-process clipping reuses it instead of reading every gradient again
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))) if grads else torch.zeros(())
        self._grad_norm = norm
        if grads and self.expert_groups is None and not self._fsdp():  # sharded: logged by the clipping below
            self.log("train/grad_norm", norm)
        loss = self._loss if self._loss is not None else torch.zeros(())
        finite = torch.isfinite(loss.float() + norm).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must take the same decision: FSDP and expert shards see different gradients
            bad = (~finite).float().to(self.device)
            torch.distributed.all_reduce(bad)
            finite = bad == 0
        if bool(finite):
            self.nonfinite_in_a_row = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.trainer.nonfinite_stop_after
        step = self.global_step
        what = f"non-finite loss {float(loss):.4g}" if not torch.isfinite(loss) else f"non-finite gradient (norm {float(norm):.4g})"
        self.print(f"step {step}: {what}: update skipped ({self.nonfinite_in_a_row} in a row; "
                   f"{limit} stop the run: trainer.nonfinite_stop_after)")
        if self.logger is not None:
            self.logger.log_metrics({"train/nonfinite_steps": float(self.nonfinite_total)}, step=step)
        if self.nonfinite_in_a_row >= limit:
            first = step - self.nonfinite_in_a_row + 1
            self.nonfinite_stop = (
                f"non-finite loss or gradients at {self.nonfinite_in_a_row} steps in a row (steps {first}-{step}, "
                f"trainer.nonfinite_stop_after={limit}): stopped, with the weights from before them in last.ckpt")
            self.trainer.should_stop = True

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the norm of the whole model's gradient; sharded gradients (FSDP, expert parallelism) need
        their norm reduced over ranks, which Lightning's own clipping does not do (experiments.distributed)."""
        if not gradient_clip_val:
            return
        if self.expert_groups is not None or self._fsdp():  # each rank holds a shard: the norm over all ranks
            self.log("train/grad_norm", distributed.clip_grad_norm(self, float(gradient_clip_val), self.expert_groups))
            return
        # by hand rather than through Lightning's precision plugin, which refuses fused AdamW under AMP; the
        # gradients here are true-scale (no GradScaler runs with a fused AdamW: see adamw_fused)
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:  # a skipped (non-finite) step has dropped every gradient
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
        else:
            torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), self._grad_norm)

    def _fsdp(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, distributed.FSDPStrategy)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # the step's forwards have all run: routers close the step (global-batch load, aux-loss-free bias)
        self.model.end_step()

    # Validation metrics go to the logger from experiments.progress.ValidationReport at step = global_step
    # (logger=False here), so a resumed run continues one consistent metric history.
    def validation_step(self, batch, batch_idx):
        if batch_idx == 0 and self.moe_layers:  # the same fixed batch at every validation: router saturation
            with record_routing(self.moe_layers) as routing:
                lm_loss, _ = self._lm_loss(batch)
            self._val_routing = (batch[0], routing)
        else:
            lm_loss, _ = self._lm_loss(batch)
        # sync_dist: the mean over ranks, so that every rank agrees on val/loss (and so on writing best.ckpt)
        self.log("val/loss", lm_loss, prog_bar=True, logger=False, sync_dist=True)
        self.log_bits("val", lm_loss, prog_bar=True, logger=False, sync_dist=True)

    def on_validation_epoch_end(self):
        """Log expert utilization gathered since the last validation, per MoE layer, then reset it.

        Scalars (MoE.utilization_stats, and tokens_per_expert/<e>) go to the logger as moe/<layer>/<stat>;
        the raw counters to <run dir>/utilization/step_<N>.npz, logged as an MLflow artifact under
        utilization/ (see experiments.utilization)."""
        if self.trainer.sanity_checking or not self.moe_layers:
            return
        for name, moe in self.moe_layers.items():
            distributed.reduce_utilization(moe)  # the global batch's counts on every rank
            stats = moe.utilization_stats()
            for e, count in enumerate(stats["tokens_per_expert"]):
                self.log(f"moe/{name}/tokens_per_expert/{e}", float(count), logger=False)
            for key, value in stats.items():
                if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                    self.log(f"moe/{name}/{key}", float(value), logger=False)
        logger = self.logger
        if self.trainer.is_global_zero and logger is not None and getattr(logger, "run_id", None):
            step = self.trainer.global_step
            val_tokens, val_routing = self._val_routing
            arrays = snapshot_arrays(self.moe_layers, step, val_tokens, val_routing)
            path = save_snapshot(snapshot_path(Path(self.cfg.out_dir) / "runs" / logger.run_id, step), arrays)
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="utilization")
        for moe in self.moe_layers.values():
            moe.reset_utilization()
        self._val_routing = (None, {})

    def configure_optimizers(self):
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # norms, biases and the SSM's A_log / D are not decayed (as in Mamba and GPT-style training)
            skip = p.ndim < 2 or getattr(p, "_no_weight_decay", False)
            (no_decay if skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        fused = adamw_fused(o.impl, [p for g in groups for p in g["params"]], precision)
        self._adamw_impl = {"fused": True if fused else None, "foreach": True if o.impl == "foreach" else None}
        kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **self._adamw_impl)
        if o.get("master_weights", False):
            opt = MasterAdamW(groups, masters=self._fp32_init, **kw)
            self._fp32_init = None  # the optimizer holds them now
        else:
            opt = torch.optim.AdamW(groups, **kw)
        total = self.cfg.trainer.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, o.warmup_steps, total, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self):
        """A resumed run takes AdamW's implementation from its own config: the optimizer state restored from a
        checkpoint (after configure_optimizers) carries the saving run's choice in its param groups. Fused AdamW
        keeps its step counts on the weights' device, the others on the CPU."""
        impl = self._adamw_impl
        if impl is None:
            return
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group.update(impl)
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    if "step" in state:
                        state["step"] = state["step"].to(p.device if impl["fused"] else "cpu", torch.float32)

    def on_save_checkpoint(self, checkpoint):
        # everything needed to rebuild the model without this process: plain types only (weights_only loads)
        checkpoint["run_config"] = OmegaConf.to_yaml(self.cfg)
        checkpoint["vocab_size"] = self.model.cfg.vocab_size
        checkpoint["bytes_per_token"] = self.bytes_per_token
        checkpoint["nonfinite"] = {"in_a_row": self.nonfinite_in_a_row, "total": self.nonfinite_total}
        if self.expert_groups is not None:  # whole experts: the checkpoint is the single-process model's
            distributed.gather_expert_checkpoint(checkpoint, self, self.trainer.optimizers, self.expert_groups)

    def on_load_checkpoint(self, checkpoint):
        # resuming: the masters come from the checkpoint's optimizer state (or, for a weight without one, from
        # the restored weight), not from this process's fresh initialisation
        self._fp32_init = None
        counts = checkpoint.get("nonfinite", {})
        if self.expert_groups is not None:
            distributed.shard_expert_checkpoint(checkpoint, self, self.expert_groups)
        self.nonfinite_in_a_row, self.nonfinite_total = counts.get("in_a_row", 0), counts.get("total", 0)
