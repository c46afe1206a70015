"""The sequence-mixer contract (Mamba, Mamba-2, attention, and user plug-ins).

Shapes: B batch, L sequence length, D model width.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn


class Mixer(nn.Module, ABC):
    """A causal sequence mixer: y[:, t] depends only on x[:, :t+1].

    forward(x_BLD, cache=None): the parallel (training) path. With a cache, the L new tokens
        continue the sequence held in the cache, and the cache is updated in place, so a prompt
        can be prefilled in one call and generation continued with `step`.
    step(x_BD, cache): one new token, O(1) work for SSMs (KV-cache append for attention).
    allocate_cache(batch_size, max_len, device, dtype): an empty recurrent state.
    """

    @abstractmethod
    def forward(self, x_BLD: Tensor, cache: Any | None = None) -> Tensor:
        """Mix along the sequence; see the class docstring for the cache semantics."""

    @abstractmethod
    def step(self, x_BD: Tensor, cache: Any) -> Tensor:
        """Advance the recurrent state by one token and return its output."""

    @abstractmethod
    def allocate_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        """Return a zeroed recurrent state for `batch_size` sequences of up to `max_len` tokens."""
