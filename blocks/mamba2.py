"""The Mamba-2 mixer (Dao & Gu 2024, arXiv 2405.21060) on the pure-PyTorch SSD scan of blocks/ssd.py.

Shapes: B batch, L length, D d_model, E d_inner = expand * D, H heads, P headdim (E = H * P),
G groups sharing B and C, N d_state, X conv channels = E + 2 * G * N, K d_conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.conv import causal_conv1d, causal_conv1d_step
from blocks.mixer import Mixer
from blocks.ssd import ssd_chunked, ssd_step


@dataclass
class Mamba2Config:
    d_state: int = 64  # N
    d_conv: int = 4  # K
    expand: int = 2  # d_inner = expand * d_model
    headdim: int = 32  # P
    ngroups: int = 1  # G: B and C are shared by the nheads // ngroups heads of a group
    chunk_size: int = 64  # Q of the chunked scan: near-fastest and least memory on GPU; 32 is faster on CPU
    A_init_range: tuple[float, float] = (1, 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in_proj and out_proj
    norm_eps: float = 1e-5


@dataclass
class Mamba2Cache:
    """Decoding state: the last K conv inputs conv_state (B, X, K) and the SSM state ssm_state (B, H, P, N), fp32."""

    conv_state: Tensor
    ssm_state: Tensor


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, gate before norm as Mamba-2 does.

    Statistics are taken per group of `group_size` channels (d_inner / ngroups), like Mamba-2, so a
    tensor-parallel split along groups needs no cross-device reduction; with ngroups=1 it is a plain RMSNorm.
    """

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return (h.flatten(-2) * self.weight.float()).to(y.dtype)


class Mamba2(Mixer):
    """Mamba-2 block: in_proj -> causal depthwise conv + SiLU on (x, B, C) -> SSD -> gated RMSNorm -> out_proj.

    Per head h, with a scalar A_h = -exp(A_log_h) and dt_t = softplus(dt_raw_t + dt_bias_h) (paper Sec. 7):

        h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T,     y_t = h_t C_t + D_h x_t,

    computed in training and prefill as the chunked SSD (Sec. 6) and in decoding as this recurrence. The
    output is out_proj(RMSNorm(y * silu(z))) with z the gate branch of in_proj.
    """

    def __init__(self, d_model: int, cfg: Mamba2Config):
        super().__init__()
        sizes = dict(d_model=d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                     headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"mamba2: {name} must be >= 1, got {value}")
        self.d_inner = cfg.expand * d_model
        if self.d_inner % cfg.headdim:
            raise ValueError(
                f"mamba2: d_inner = expand * d_model = {self.d_inner}"
                f" is not divisible by headdim={cfg.headdim}"
            )
        self.nheads = self.d_inner // cfg.headdim
        if self.nheads % cfg.ngroups:
            raise ValueError(
                f"mamba2: nheads = d_inner / headdim = {self.nheads}"
                f" is not divisible by ngroups={cfg.ngroups}"
            )
        if not 0 < cfg.A_init_range[0] <= cfg.A_init_range[1]:
            raise ValueError(f"mamba2: A_init_range must satisfy 0 < low <= high, got {cfg.A_init_range}")
        if not 0 < cfg.dt_min <= cfg.dt_max:
            raise ValueError(f"mamba2: need 0 < dt_min <= dt_max, got dt_min={cfg.dt_min}, dt_max={cfg.dt_max}")
        self.d_state, self.d_conv, self.headdim = cfg.d_state, cfg.d_conv, cfg.headdim
        self.ngroups, self.chunk_size = cfg.ngroups, cfg.chunk_size
        E, H, G, N = self.d_inner, self.nheads, cfg.ngroups, cfg.d_state
        self.conv_dim = E + 2 * G * N

        self.in_proj = nn.Linear(d_model, 2 * E + 2 * G * N + H, bias=cfg.bias)  # -> z, x, B, C, dt
        # padding=0: callers prepend the K-1 previous inputs (zeros, or the cache), which keeps it causal
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)

        # dt log-uniform in [dt_min, dt_max]; store softplus^{-1}(dt) so that softplus(dt_bias) = dt at init
        dt = torch.exp(torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(*cfg.A_init_range)))
        self.D = nn.Parameter(torch.ones(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

        self.norm = GatedRMSNorm(E, group_size=E // G, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(E, d_model, bias=cfg.bias)

    def _split_proj(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj output -> z (..., E), xBC (..., X), dt (..., H) fp32 after softplus(dt + dt_bias)."""
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        return z, xBC, F.softplus(dt.float() + self.dt_bias.float())

    def _split_xBC(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Conv output (..., X) -> x (..., H, P), B (..., G, N), C (..., G, N)."""
        G, N = self.ngroups, self.d_state
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        return x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))

    def forward(self, x_BLD: Tensor, cache: Mamba2Cache | None = None) -> Tensor:
        batch, length, _ = x_BLD.shape
        z_BLE, xBC_BLX, dt_BLH = self._split_proj(self.in_proj(x_BLD))

        state = None if cache is None else cache.conv_state
        xBC_BLX = F.silu(causal_conv1d(xBC_BLX.transpose(1, 2), self.conv1d, state)).transpose(1, 2)

        x_BLHP, B_BLGN, C_BLGN = self._split_xBC(xBC_BLX)
        A_H = -torch.exp(self.A_log.float())  # A < 0 by construction
        y_BLHP, state_BHPN = ssd_chunked(
            x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, self.D,
            initial_state=None if cache is None else cache.ssm_state,
            return_last_state=True, chunk_size=self.chunk_size,
        )
        if cache is not None:
            cache.ssm_state.copy_(state_BHPN)
        y_BLE = self.norm(y_BLHP.reshape(batch, length, self.d_inner), z_BLE)
        return self.out_proj(y_BLE)

    def step(self, x_BD: Tensor, cache: Mamba2Cache) -> Tensor:
        batch = x_BD.shape[0]
        z_BE, xBC_BX, dt_BH = self._split_proj(self.in_proj(x_BD))

        xBC_BX = F.silu(causal_conv1d_step(xBC_BX, self.conv1d, cache.conv_state))

        x_BHP, B_BGN, C_BGN = self._split_xBC(xBC_BX)
        A_H = -torch.exp(self.A_log.float())
        y_BHP = ssd_step(cache.ssm_state, x_BHP, dt_BH, A_H, B_BGN, C_BGN, self.D)
        y_BE = self.norm(y_BHP.reshape(batch, self.d_inner), z_BE)
        return self.out_proj(y_BE)

    def allocate_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Mamba2Cache:
        """Zeroed state; its size does not depend on max_len (that is the point of an SSM)."""
        device = device or self.in_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return Mamba2Cache(conv_state, ssm_state)
