"""Gated MLP (GLU family, Shazeer 2020 "GLU Variants Improve Transformer"), shared by dense and MoE blocks.

Shapes: B batch, L length, D model width, F hidden (ffn) width.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

# Gate nonlinearity of each GLU variant. GeGLU uses the exact (erf) GELU, as BlackMamba's released code does
# (F.gelu with its default approximation).
GLU_GATES: dict[str, Callable[[Tensor], Tensor]] = {"swiglu": F.silu, "geglu": F.gelu}


def glu_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The GLU of `name`, as a function of the fused input projection h (..., 2F) -> (..., F).

    The first half of h is the gate, the second the value: swiglu = silu(gate) * up, geglu = gelu(gate) * up.
    """
    if name not in GLU_GATES:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(GLU_GATES)}")
    gate_fn = GLU_GATES[name]

    def glu(h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return gate_fn(gate) * up

    return glu


class MLP(nn.Module):
    """y = fc2(act(x W_gate) * (x W_up)), with W_gate and W_up fused into fc1 (D -> 2F); no biases."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "swiglu"):
        super().__init__()
        if d_model < 1 or ffn_dim < 1:
            raise ValueError(f"d_model and ffn_dim must be >= 1, got d_model={d_model}, ffn_dim={ffn_dim}")
        self.act = glu_activation(activation)
        self.activation = activation
        self.fc1 = nn.Linear(d_model, 2 * ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x_BLD: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x_BLD)))
