"""The Lightning side of tests/test_distributed.py: a tiny BlackMamba (Mamba + Sinkhorn MoE with
balance_scope=global_batch) trained for two steps through experiments.train._make_trainer, on the rows of a fixed
global batch that belong to this rank. Writes, from rank 0, each step's loss on every rank, the gradients after
clipping (whole: expert shards gathered) and the final checkpoint, for the test to compare with one process.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from blocks.expert_parallel import gather_experts
from experiments.checkpoint import VerifiedCheckpointIO
from experiments.config import compose
from experiments.module import LMModule
from experiments.train import _make_trainer

GLOBAL_BATCH, SEQ_LEN, STEPS = 4, 16, 2


class GlobalBatchRows(IterableDataset):
    """Step i's global batch (the same on every rank), cut into equal row blocks, one per rank."""

    def __iter__(self):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        rows = GLOBAL_BATCH // world
        for i in range(STEPS):
            w = torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(100 + i))
            w = w[rank * rows:(rank + 1) * rows]
            yield w[:, :-1], w[:, 1:]


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class Record(Callback):
    def __init__(self, with_grads: bool):
        self.with_grads, self.losses, self.grads = with_grads, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().reshape(1)
        if dist.is_initialized():
            losses = [torch.empty_like(loss) for _ in range(dist.get_world_size())]
            dist.all_gather(losses, loss)
            loss = torch.cat(losses)
        self.losses.append(loss)
        if not self.with_grads:
            return
        grads = {}  # this step's gradients, as the optimizer used them (after synchronisation and clipping)
        for name, p in pl_module.named_parameters():
            g = p.grad.detach().clone()
            if getattr(p, "_expert_parallel", False):
                g = gather_experts(g, pl_module.expert_groups)
            grads[_clean(name)] = g
        self.grads.append(grads)


def run(out: Path, strategy: str, expert_parallel: str = "1", *overrides: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = compose(["model=tiny", "data.seq_len=16", f"data.batch_size={GLOBAL_BATCH // world}",
                   "router.balance_scope=global_batch", "trainer.accelerator=cpu", f"trainer.devices={world}",
                   f"trainer.strategy={strategy}", f"moe.expert_parallel={expert_parallel}",
                   f"trainer.max_steps={STEPS}", "trainer.val_every=100", "trainer.progress_bar=false",
                   "trainer.grad_clip=0.05", "optim.warmup_steps=0", f"out_dir={out}", *overrides])
    L.seed_everything(cfg.seed, verbose=False)
    module = LMModule(cfg, 256, 1.0)
    record = Record(with_grads=strategy != "fsdp")  # FSDP's gradients are sharded flat buffers
    trainer = _make_trainer(cfg, "cpu", False, [record], VerifiedCheckpointIO())
    trainer.fit(module, train_dataloaders=DataLoader(GlobalBatchRows(), batch_size=None))
    trainer.save_checkpoint(out / "final.ckpt", weights_only=False)  # every rank: the state is gathered
    masters = {}  # optim.master_weights: the fp32 masters, by parameter name
    for opt in trainer.optimizers:
        names = {id(p): _clean(n) for n, p in module.named_parameters()}
        for p, state in opt.state.items():
            if "master" in state:
                masters[names[id(p)]] = state["master"].clone()
    if trainer.global_rank == 0:
        torch.save({"masters": masters, "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
                    "losses": [x.tolist() for x in record.losses], "grads": record.grads,
                    "world": trainer.world_size}, out / "rank0.pt")
