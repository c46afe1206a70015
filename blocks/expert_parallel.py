"""Expert parallelism: an MoE layer's experts sharded over a group of ranks, tokens sent to them by all-to-all.

With W ranks and an expert-parallel size P (moe.expert_parallel, P divides W and the layer's E experts), the
ranks form W/P expert-parallel (EP) groups of P consecutive ranks (on one node they share its fast links);
rank j of a group holds experts [j*E/P, (j+1)*E/P). Every rank still routes its own tokens with the full
gate, so data parallelism goes on over all W ranks. A layer's forward on each rank:

 1. sort its kept slots by expert, count them per expert and exchange the counts (all_to_all_single),
    so that every rank knows how many rows it sends to and receives from each peer (variable split sizes);
 2. send each slot's hidden state to the rank holding its expert (all_to_all_single, differentiable);
 3. run its local experts on the rows received, grouped by expert (blocks.moe.moe_experts);
 4. send the results back the same way and combine them per token with the gate weights, in fp32.

The output and the gradients are those of the single-process layer (tests/test_distributed.py): the
all-to-all's backward is the all-to-all with the split sizes swapped, so each expert's weight gradient is
the sum over the tokens of every rank of its EP group.

Gradients of expert weights (parameters marked with `_expert_parallel = True`): ranks of one EP group hold
different experts, so they must not be averaged together the way DDP averages replicated parameters (DDP
would also broadcast rank 0's experts over the others' at start). They are left out of DDP
(experiments.distributed puts them on DDP's ignore list) and `sync_expert_grads` sums them over the ranks
that hold the same experts (one per EP group: the expert-replica group), divided by the world size W, which
is what DDP's averaging gives every other parameter: d/dw of the mean of the W ranks' losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from routers import count_per_expert


@dataclass
class ExpertGroups:
    """This rank's expert-parallel group (size P, its index in it) and its expert-replica group (the ranks
    with the same experts, one per EP group; None when there is only one)."""

    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    replica_group: dist.ProcessGroup | None
    world_size: int


def expert_groups(ep_size: int) -> ExpertGroups:
    """Create the EP and replica process groups (every rank must call this, in the same order)."""
    if not dist.is_initialized():
        raise RuntimeError("moe.expert_parallel > 1 needs torch.distributed to be initialised (trainer.devices > 1 "
                           "or torchrun / SLURM)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"moe.expert_parallel={ep_size} must divide the number of processes {world}")
    ep_group = replica_group = None
    for start in range(0, world, ep_size):  # new_group is collective: every rank creates every group
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    if world > ep_size:
        for j in range(ep_size):
            group = dist.new_group(list(range(j, world, ep_size)))
            if rank % ep_size == j:
                replica_group = group
    return ExpertGroups(ep_group, ep_size, rank % ep_size, replica_group, world)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with variable split sizes; backward sends the gradients back the other way.
    Every rank must reach the backward of each call (ep_moe_experts keeps the graph connected)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def ep_moe_experts(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None,
                   w_in_local: Tensor, w_out_local: Tensor, activation: str, groups: ExpertGroups) -> Tensor:
    """blocks.moe.moe_experts over experts sharded across `groups.ep_group`: the same function of the same
    arguments, except that w_in_local / w_out_local hold only this rank's E/P experts. expert_ids_TK are
    global expert ids. Reads the per-peer row counts back to the host (all-to-all sizes must be known)."""
    from blocks.moe import moe_experts  # blocks.moe imports this module

    T, D = x_TD.shape
    K = expert_ids_TK.shape[1]
    P, E_local = groups.ep_size, w_in_local.shape[0]
    E = P * E_local
    ids_S = expert_ids_TK.reshape(-1)
    if mask_TK is not None:
        ids_S = torch.where(mask_TK.reshape(-1), ids_S, E)  # dropped slots sort last and are not sent
    order_S = torch.argsort(ids_S, stable=True)
    counts_E = count_per_expert(ids_S, E + 1)[:E]
    recv_counts_E = torch.empty_like(counts_E)  # (P, E_local) flattened: rows from peer p for local expert e
    dist.all_to_all_single(recv_counts_E, counts_E, group=groups.ep_group)
    send_splits = counts_E.view(P, E_local).sum(1).tolist()
    recv_splits = recv_counts_E.view(P, E_local).sum(1).tolist()
    order_S = order_S[: sum(send_splits)]
    token_S = order_S // K

    # send in the experts' compute dtype (bf16 under autocast): half the bytes, the same values they would use
    device_type = x_TD.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_TD.dtype
    send_SD = x_TD[token_S].to(dtype)
    recv_RD = _AllToAll.apply(send_SD, recv_splits, send_splits, groups.ep_group)
    local_ids_R = torch.repeat_interleave(torch.arange(E_local, device=x_TD.device).repeat(P), recv_counts_E)
    ones_R1 = torch.ones(recv_RD.shape[0], 1, device=x_TD.device)
    y_RD = moe_experts(recv_RD, local_ids_R[:, None], ones_R1, None, w_in_local, w_out_local, activation)
    if y_RD.shape[0] == 0 and torch.is_grad_enabled():
        # No row reached this rank's experts, so y_RD is a constant: autograd would skip the backward of both
        # all-to-alls here while the other ranks wait in theirs. A zero term keeps them (and the weights) in.
        y_RD = y_RD + 0 * (recv_RD.sum() + w_in_local.sum() + w_out_local.sum())
    y_SD = _AllToAll.apply(y_RD, send_splits, recv_splits, groups.ep_group)
    w_S1 = weights_TK.reshape(-1)[order_S].float()[:, None]
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    return out_TD.index_add_(0, token_S, y_SD.float() * w_S1).to(x_TD.dtype)


def shard_experts(moe, groups: ExpertGroups) -> None:
    """Keep only this rank's experts of an MoE layer (w_in, w_out sliced to E/P experts, as new parameters
    marked `_expert_parallel`) and route its forward through ep_moe_experts. All ranks must hold the same full
    weights before (the same seed), so that the shards together are the single-process layer."""
    E, P = moe.num_experts, groups.ep_size
    if E % P:
        raise ValueError(f"moe.expert_parallel={P} must divide the layer's {E} experts")
    lo, hi = groups.ep_rank * (E // P), (groups.ep_rank + 1) * (E // P)
    for name in ("w_in", "w_out"):
        full = getattr(moe, name)
        shard = torch.nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
        shard._expert_parallel = True
        setattr(moe, name, shard)
    moe.expert_groups = groups
    moe.expert_range = (lo, hi)


def expert_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if getattr(p, "_expert_parallel", False)]


@torch.no_grad()
def sync_expert_grads(module: torch.nn.Module, groups: ExpertGroups) -> None:
    """Expert-parameter gradients summed over the expert-replica group and divided by the world size (see the
    module docstring); a missing gradient (no token reached these experts anywhere) counts as zero. Call once
    per optimizer step, after the last backward and before clipping or the step."""
    for _, p in expert_parameters(module):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if groups.replica_group is not None:
            dist.all_reduce(p.grad, group=groups.replica_group)
        p.grad.div_(groups.world_size)


@torch.no_grad()
def gather_experts(shard: Tensor, groups: ExpertGroups) -> Tensor:
    """The full (E, ...) tensor from every EP rank's (E/P, ...) shard, in expert order."""
    pieces = [torch.empty_like(shard) for _ in range(groups.ep_size)]
    dist.all_gather(pieces, shard.contiguous(), group=groups.ep_group)
    return torch.cat(pieces)
