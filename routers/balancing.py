"""Balancing that acts between optimizer steps: the load of the last step, for the global-batch balance loss
and for auxiliary-loss-free balancing.

    Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training Specialized
        Mixture-of-Expert Models" (arXiv 2501.11873): expert frequencies f_i of the global batch.
    DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), sec. 2.1.2, and Wang et al. 2024,
        "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (arXiv 2408.15664), Algorithm 1:
        a per-expert selection bias b_i += gamma * sign(mean load - load_i) after every step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def all_reduce_sum(t: Tensor) -> Tensor:
    """t summed over the data-parallel ranks in place, when torch.distributed is initialised; t otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class StepLoad(nn.Module):
    """The slots each expert took in the last optimizer step, over the whole global batch, and what a
    router derives from it.

    observe(counts_E) adds one training forward's (one micro-batch's) slots per expert to the running step
    total, on the device. end_step(), once per optimizer step after the step's forwards (`LM.end_step`),
    sums that total over the data-parallel ranks (all_reduce when torch.distributed is initialised), so every
    rank holds the load of the whole global batch, then:

    - keep_counts: stores it as `last_counts` (E,), from which frequencies() gives f_i = c_i / sum_j c_j
      for the global-batch balance loss (uniform before the first step);
    - bias_update_rate = gamma > 0: moves the selection bias b_i by gamma * sign(mean_j c_j - c_i): down for
      an overloaded expert, up for an underloaded one, unchanged where the load is exactly the mean.

    Both depend on the counts only up to a common factor, so a forward that runs twice (recomputation)
    changes neither. The bias is kept as an integer number of gamma steps (`bias_steps`, int64): b = gamma
    * bias_steps is exact whatever dtype the model is cast to, and the same on every rank. `last_counts` and
    `bias_steps` are persistent buffers (checkpointed, so a resumed run continues with them); the running
    step total is a plain tensor, neither saved nor broadcast by DDP with the buffers, made at the first
    forward and zeroed in place by end_step. A step that observed nothing leaves the bias alone (the sign of
    mean - load is 0 everywhere) and keeps zero counts, from which frequencies() gives 1/E.
    """

    def __init__(self, num_experts: int, bias_update_rate: float = 0.0, keep_counts: bool = False):
        super().__init__()
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0 (0 = no bias), got {bias_update_rate}")
        self.num_experts = num_experts
        self.bias_update_rate = bias_update_rate
        self.keep_counts = keep_counts
        if bias_update_rate > 0:
            self.register_buffer("bias_steps", torch.zeros(num_experts, dtype=torch.int64))
        if keep_counts:
            self.register_buffer("last_counts", torch.zeros(num_experts, dtype=torch.int64))
        self._step_counts: Tensor | None = None

    @property
    def bias_E(self) -> Tensor | None:
        """The selection bias (E,) fp32, or None without a bias."""
        if self.bias_update_rate == 0:
            return None
        return self.bias_update_rate * self.bias_steps.float()

    def frequencies(self) -> Tensor:
        """f_E (E,) fp32: the fraction of the last step's slots that each expert took (1/E before any step)."""
        counts_E = self.last_counts.float()
        total = counts_E.sum()
        return torch.where(total > 0, counts_E / total.clamp(min=1), 1.0 / self.num_experts)

    @torch.no_grad()
    def observe(self, counts_E: Tensor) -> None:
        """Add one training forward's slots per expert to this step's total (no host synchronisation)."""
        if self._step_counts is None or self._step_counts.device != counts_E.device:
            self._step_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=counts_E.device)
        self._step_counts += counts_E

    @torch.no_grad()
    def end_step(self) -> None:
        """Close the step: reduce its load over ranks, keep it and/or move the bias; start a new step."""
        if self._step_counts is None:
            return
        counts_E = all_reduce_sum(self._step_counts.clone())
        # zeroed in place, not dropped: a training step captured in a CUDA graph (experiments.train_graph)
        # keeps adding into this very tensor
        self._step_counts.zero_()
        if self.keep_counts:
            self.last_counts.copy_(counts_E)
        if self.bias_update_rate > 0:
            load_E = counts_E.double()
            self.bias_steps += torch.sign(load_E.mean() - load_E).long()
