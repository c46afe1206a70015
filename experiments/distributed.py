"""Several processes: Lightning's DDP and FSDP strategies, and expert parallelism (blocks/expert_parallel.py)
composed with them. docs/distributed.md is the user's guide.

- trainer.strategy=ddp: Lightning's DDPStrategy. Expert-parallel weights and the MoE layers' utilization
  counters are on DDP's ignore list: the first differ between ranks by design, and DDP would otherwise
  broadcast rank 0's copy of both over the other ranks (counters are buffers, which DDP broadcasts before
  every forward). Expert gradients are then reduced by blocks.expert_parallel.sync_expert_grads.
- trainer.strategy=fsdp: Lightning's FSDPStrategy, one FSDP unit per residual block (MixerBlock, MLPBlock),
  mixed precision from trainer.precision (bf16-mixed: bf16 parameters in compute, gradients reduced in fp32),
  full state dicts in checkpoints. Not with moe.expert_parallel > 1.
- DDP on a CPU uses gloo, on CUDA NCCL. FSDP needs CUDA (torch's FSDP refuses CPU-only processes); on the CPU
  the tests shard the same model per block with torch's fully_shard instead.

Gradient clipping: Lightning's FSDP precision plugin refuses clipping by norm, and under expert parallelism
the norm must include every rank's expert shard, so LMModule.configure_gradient_clipping calls clip_grad_norm
below, which computes the norm of the whole model in either case.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import Tensor, nn

from blocks.expert_parallel import ExpertGroups, expert_groups, expert_parameters, gather_experts, shard_experts
from blocks.model import MixerBlock, MLPBlock
from blocks.moe import MoE

STRATEGIES = ("auto", "ddp", "fsdp")
FSDP_UNITS = (MixerBlock, MLPBlock)  # one FSDP unit per residual block: its weights are gathered just for it
# MoE buffers that count what this rank routed; summed over ranks for logging (reduce_utilization)
COUNTERS = ("tokens_per_expert", "dropped_tokens", "routed_slots", "tokens_without_expert", "num_tokens",
            "router_entropy_sum", "router_prob_sum", "coactivation", "aux_loss_sum", "aux_loss_count",
            "token_expert", "token_counts")


def check_parallel(strategy: str, world_size: int, expert_parallel: int) -> None:
    """Errors a user can act on, before anything starts."""
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    if expert_parallel > 1:
        if world_size % expert_parallel:
            raise ValueError(f"moe.expert_parallel={expert_parallel} must divide the number of processes "
                             f"{world_size} (trainer.devices x trainer.num_nodes)")
        if strategy == "fsdp":
            raise ValueError("moe.expert_parallel > 1 works with trainer.strategy=ddp (or auto), not fsdp")


def make_strategy(strategy: str, accelerator: str, world_size: int, expert_parallel: int, precision: str):
    """The Lightning strategy (a name or an instance) for trainer.strategy; `precision` is the resolved
    trainer.precision."""
    backend = "gloo" if accelerator == "cpu" else None  # None: Lightning's default for the device (NCCL)
    if strategy == "fsdp":
        # Lightning's FSDPStrategy wraps torch's FSDP, which needs an accelerator: Lightning refuses a CPU one.
        # bf16-mixed: bf16 weights in compute, but gradients reduced and float buffers (the MoE's counters,
        # sums of many tokens) kept in fp32; Lightning's own choice for bf16-mixed would make all three bf16.
        mixed = None
        if precision == "bf16-mixed":
            from torch.distributed.fsdp import MixedPrecision
            mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        return FSDPStrategy(auto_wrap_policy=set(FSDP_UNITS), state_dict_type="full", mixed_precision=mixed)
    if strategy == "ddp" or (strategy == "auto" and (world_size > 1 or expert_parallel > 1)):
        return DDPStrategy(process_group_backend=backend)
    return "auto"


def setup_module(module: nn.Module, model: nn.Module, expert_parallel: int) -> ExpertGroups | None:
    """Once torch.distributed is up and before DDP wraps `module` (LightningModule.setup): shard the experts
    when expert_parallel > 1, and put expert weights and MoE counters on DDP's ignore list."""
    groups = None
    if expert_parallel > 1:
        groups = expert_groups(expert_parallel)
        for moe in model.modules():
            if isinstance(moe, MoE):
                shard_experts(moe, groups)
    ignored = [name for name, _ in expert_parameters(module)]
    ignored += [name for name, _ in module.named_buffers() if name.rsplit(".", 1)[-1] in COUNTERS]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return groups


@torch.no_grad()
def reduce_utilization(moe: MoE) -> None:
    """Sum a layer's utilization counters over all ranks in place (every rank must call it), so the statistics
    logged are those of the global batch."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for name in COUNTERS:
            dist.all_reduce(getattr(moe, name))


def clip_grad_norm(module: nn.Module, max_norm: float, groups: ExpertGroups | None) -> Tensor:
    """Scale all gradients so that the norm of the whole model's gradient is at most max_norm; returns it.

    Under FSDP each rank holds a shard of every gradient: the squares are summed over all ranks. Under expert
    parallelism the replicated gradients are the same on every rank and the expert ones are shards over the
    EP group: their squares are summed over it. Single process: torch.nn.utils.clip_grad_norm_'s result."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        sq = torch.stack([g.float().square().sum() for g in grads]).sum() if grads else torch.zeros(())
        dist.all_reduce(sq)
    else:
        expert = {id(p) for _, p in expert_parameters(module)}
        shared = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in expert]
        local = [p.grad for p in module.parameters() if p.grad is not None and id(p) in expert]
        sq = torch.zeros((), device=grads[0].device if grads else None)
        if shared:
            sq = sq + torch.stack([g.float().square().sum() for g in shared]).sum()
        if local and groups is not None:
            sq_local = torch.stack([g.float().square().sum() for g in local]).sum()
            dist.all_reduce(sq_local, group=groups.ep_group)
            sq = sq + sq_local
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


def _expert_state_index(optimizer) -> dict[int, str]:
    """Optimizer state index (as in optimizer.state_dict()) -> parameter name, for expert-parallel parameters."""
    index, out = 0, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if getattr(p, "_expert_parallel", False):
                out[index] = p
            index += 1
    return out


def gather_expert_checkpoint(checkpoint: dict, module: nn.Module, optimizers, groups: ExpertGroups) -> None:
    """Replace this rank's expert shards in a checkpoint by the full expert tensors (weights and AdamW moments),
    so that a checkpoint is the single-process model's whatever the expert-parallel size (every rank calls it;
    only rank 0 writes the file)."""
    state = checkpoint["state_dict"]
    for name, p in expert_parameters(module):
        state[name] = gather_experts(p.detach(), groups)
    for opt, opt_state in zip(optimizers, checkpoint.get("optimizer_states", [])):
        for index, p in _expert_state_index(opt).items():
            live = opt_state["state"].get(index, {})  # the optimizer's own dict: replaced, never changed
            opt_state["state"][index] = {key: gather_experts(value, groups)
                                         if torch.is_tensor(value) and value.shape == p.shape else value
                                         for key, value in live.items()}


def shard_expert_checkpoint(checkpoint: dict, module: nn.Module, groups: ExpertGroups) -> None:
    """The inverse of gather_expert_checkpoint on load: keep this rank's experts of every full expert tensor.
    The optimizer's states are cut the same way: state index -> parameter follows configure_optimizers' order
    (decay group, then no-decay group), which is read from a fresh optimizer built the same way."""
    state = checkpoint["state_dict"]
    P, r = groups.ep_size, groups.ep_rank
    for name, p in expert_parameters(module):
        n = p.shape[0]
        state[name] = state[name][r * n:(r + 1) * n].clone()
    opts = module.configure_optimizers()
    opt = opts["optimizer"] if isinstance(opts, dict) else opts
    for opt_state in checkpoint.get("optimizer_states", [])[:1]:
        for index, p in _expert_state_index(opt).items():
            for key, value in opt_state["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.ndim == p.ndim and value.shape[0] == p.shape[0] * P:
                    n = p.shape[0]
                    opt_state["state"][index][key] = value[r * n:(r + 1) * n].clone()
