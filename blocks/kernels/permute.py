"""Group routed slots by expert: a stable counting sort on the GPU with no host synchronisation.

Shapes: T tokens, K slots per token, S = T*K slots (flat slot index s = t*K + k), E experts,
P = S sorted positions, NB blocks of BLOCK slots.

    order_P[p]   the slot at sorted position p: slots of expert 0 first, then expert 1, ...,
                 token order within an expert (stable), masked (dropped) slots last
    offsets_E1   start of each expert's group; offsets_E1[E] = number of active slots

Three launches: per-block histograms, a scan over blocks, and a scatter that places each slot at
its expert's start + the count of same-expert slots in earlier blocks + its rank within its block.
Every slot's position is a function of the ids alone, so the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def permute_slots_ref(expert_ids_TK: Tensor, num_experts: int, mask_TK: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PyTorch twin of `permute_slots`: (order_P int32, offsets_E1 int32)."""
    ids_S = expert_ids_TK.reshape(-1).long()
    if mask_TK is not None:
        ids_S = torch.where(mask_TK.reshape(-1), ids_S, num_experts)
    order_P = torch.argsort(ids_S, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_S.device)
    counts.scatter_add_(0, ids_S, torch.ones_like(ids_S))
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids_S.device)
    offsets_E1[1:] = counts[:num_experts].cumsum(0).to(torch.int32)
    return order_P, offsets_E1


@triton.jit
def _load_ids(ids_ptr, mask_ptr, offs, S, E, HAS_MASK: tl.constexpr):
    # Out-of-range lanes get id E + 1, one past the dropped-slot sentinel E, so they count nowhere.
    ids = tl.load(ids_ptr + offs, mask=offs < S, other=E + 1).to(tl.int32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs, mask=offs < S, other=1) != 0
        ids = tl.where(keep, ids, E)
    return ids


@triton.jit
def _histogram_kernel(ids_ptr, mask_ptr, hist_ptr, S, E, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, EP: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = _load_ids(ids_ptr, mask_ptr, offs, S, E, HAS_MASK)
    onehot = (ids[:, None] == tl.arange(0, EP)[None, :]).to(tl.int32)  # (BLOCK, EP)
    tl.store(hist_ptr + pid * EP + tl.arange(0, EP), tl.sum(onehot, axis=0))


@triton.jit
def _scan_kernel(hist_ptr, base_ptr, offsets_ptr, NB, E, CHUNK: tl.constexpr, EP: tl.constexpr):
    # One program: exclusive prefix over blocks (base[b, e] = slots of expert e in blocks < b),
    # then each expert's group start from the column totals.
    cols = tl.arange(0, EP)
    carry = tl.zeros([EP], dtype=tl.int32)
    for b0 in range(0, NB, CHUNK):
        rows = b0 + tl.arange(0, CHUNK)
        h = tl.load(hist_ptr + rows[:, None] * EP + cols[None, :], mask=rows[:, None] < NB, other=0)
        incl = tl.cumsum(h, axis=0)
        tl.store(base_ptr + rows[:, None] * EP + cols[None, :], incl - h + carry[None, :], mask=rows[:, None] < NB)
        carry += tl.sum(h, axis=0)
    total = tl.where(cols < E, carry, 0)
    starts = tl.cumsum(total, axis=0) - total  # exclusive: start of each expert's group
    tl.store(offsets_ptr + cols, starts, mask=cols < E)
    # offsets[E] (active slots) and the dropped-slot group's start, both the sum over real experts
    tl.store(offsets_ptr + E, tl.sum(total, axis=0))


@triton.jit
def _scatter_kernel(
    ids_ptr, mask_ptr, base_ptr, offsets_ptr, order_ptr, S, E, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, EP: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = _load_ids(ids_ptr, mask_ptr, offs, S, E, HAS_MASK)
    cols = tl.arange(0, EP)
    onehot = (ids[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # earlier same-expert slots in this block
    base = tl.load(base_ptr + pid * EP + cols)
    start = tl.load(offsets_ptr + tl.minimum(cols, E), mask=cols <= E, other=0)  # dropped group starts at offsets[E]
    pos = tl.sum(onehot * (start + base)[None, :], axis=1) + rank
    tl.store(order_ptr + pos, offs.to(tl.int32), mask=offs < S)


def permute_slots(expert_ids_TK: Tensor, num_experts: int, mask_TK: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sorted slot order and expert group offsets (see the module docstring), computed on the device.

    expert_ids_TK: (T, K) integer expert per slot; mask_TK: optional (T, K) bool, False = dropped slot.
    Returns order_P (S,) int32 and offsets_E1 (E+1,) int32, equal to `permute_slots_ref`."""
    S = expert_ids_TK.numel()
    E = num_experts
    device = expert_ids_TK.device
    ids = expert_ids_TK.reshape(-1).contiguous()
    mask = mask_TK.reshape(-1).contiguous().view(torch.uint8) if mask_TK is not None else ids
    EP = triton.next_power_of_2(E + 2)  # experts, the dropped sentinel E, the out-of-range id E + 1
    BLOCK = 256 if EP > 32 else 1024
    NB = max(triton.cdiv(S, BLOCK), 1)
    hist = torch.empty(NB, EP, dtype=torch.int32, device=device)
    base = torch.empty_like(hist)
    offsets_E1 = torch.empty(E + 1, dtype=torch.int32, device=device)
    order_P = torch.empty(S, dtype=torch.int32, device=device)
    if S == 0:
        return order_P, offsets_E1.zero_()
    has_mask = mask_TK is not None
    _histogram_kernel[(NB,)](ids, mask, hist, S, E, HAS_MASK=has_mask, BLOCK=BLOCK, EP=EP)
    _scan_kernel[(1,)](hist, base, offsets_E1, NB, E, CHUNK=32, EP=EP)
    _scatter_kernel[(NB,)](ids, mask, base, offsets_E1, order_P, S, E, HAS_MASK=has_mask, BLOCK=BLOCK, EP=EP)
    return order_P, offsets_E1
