"""Causal depthwise convolution over the sequence, shared by the Mamba mixers, with its decoding state.

Shapes: B batch, C channels, L length, K kernel width. The state holds the last K inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_conv1d(x_BCL: Tensor, conv: nn.Conv1d, state_BCK: Tensor | None = None) -> Tensor:
    """y[t] = sum_k w[k] x[t - K + 1 + k] + b, with zeros before the start or, given a state, its
    cached inputs (then the state is updated in place to the last K inputs: prefill)."""
    K = conv.kernel_size[0]
    if state_BCK is None:
        prev_BCK = x_BCL.new_zeros(x_BCL.shape[0], x_BCL.shape[1], K - 1)
    else:
        prev_BCK = state_BCK[..., 1:].to(x_BCL.dtype)
    window_BCL = torch.cat([prev_BCK, x_BCL], dim=-1)  # K - 1 + L inputs -> L outputs
    if state_BCK is not None:
        state_BCK.copy_(window_BCL[..., -K:])
    return F.conv1d(window_BCL, conv.weight, conv.bias, groups=x_BCL.shape[1])


def causal_conv1d_step(x_BC: Tensor, conv: nn.Conv1d, state_BCK: Tensor) -> Tensor:
    """One new input per channel: shift it into the state (in place) and return that step's output."""
    state_BCK.copy_(torch.roll(state_BCK, shifts=-1, dims=-1))  # drop the oldest input
    state_BCK[:, :, -1] = x_BC
    y_BC = (state_BCK.to(x_BC.dtype) * conv.weight[:, 0]).sum(-1)
    return y_BC if conv.bias is None else y_BC + conv.bias
