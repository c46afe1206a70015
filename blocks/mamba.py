"""The Mamba-1 mixer as BlackMamba uses it (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2).

Shapes: B batch, L length, D d_model, E d_inner = expand * D, N d_state, R dt_rank, K d_conv.
Parameter names follow mamba-ssm's `Mamba` module, so its checkpoints load as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.conv import causal_conv1d, causal_conv1d_step
from blocks.kernels import use_triton
from blocks.kernels.causal_conv1d import causal_conv1d_step_triton, causal_conv1d_triton
from blocks.kernels.mamba_inner import mamba_inner_triton
from blocks.kernels.selective_scan import selective_scan_triton
from blocks.kernels.ssm_step import selective_state_step_triton
from blocks.mixer import Mixer
from blocks import scan_backend
from blocks.scan_backend import choose as choose_scan_backend
from blocks.scan import selective_scan_chunked, selective_state_step

# auto: Triton on CUDA (or mamba-ssm's scan where it is installed and measured faster for the shape: see
# blocks/scan_backend.py), PyTorch elsewhere. mamba_ssm: its CUDA selective scan (and causal-conv1d's conv
# when installed), the optional `.[cuda]` extra.
BACKENDS = ("auto", "torch", "triton", "mamba_ssm")
# Training on the Triton kernels runs conv, x_proj, dt_proj and the scan as one autograd function
# (blocks/kernels/mamba_inner.py); False composes the same kernels through autograd (benchmarks compare them).
FUSED_INNER = True
MAMBA_SSM_HINT = "the mamba_ssm backend needs mamba-ssm (and, for its conv, causal-conv1d): pip install .[cuda]"


def _mamba_ssm_ops():
    """(selective_scan_fn, causal_conv1d_fn or None), imported on first use."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as e:
        raise ImportError(MAMBA_SSM_HINT) from e
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn


@dataclass
class MambaConfig:
    d_state: int = 16  # N
    d_conv: int = 4  # K
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int | None = None  # R; None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False  # in_proj and out_proj
    chunk_size: int = 16  # T of the PyTorch chunked scan; 8-32 are about equally fast on CPU, 64 is ~25% slower
    backend: str = "auto"  # one of BACKENDS

    def __post_init__(self):
        sizes = dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, chunk_size=self.chunk_size)
        if self.dt_rank is not None:
            sizes["dt_rank"] = self.dt_rank
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mamba: {name} must be a positive integer, got {value!r}")
        if self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"mamba: chunk_size must be a power of two, got {self.chunk_size}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"mamba: need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if not self.dt_init_floor > 0:
            raise ValueError(f"mamba: dt_init_floor must be > 0, got {self.dt_init_floor}")
        if not self.dt_scale > 0:
            raise ValueError(f"mamba: dt_scale must be > 0, got {self.dt_scale}")
        if self.backend not in BACKENDS:
            raise ValueError(f"mamba: unknown backend '{self.backend}'. Valid choices: {', '.join(BACKENDS)}")
        if self.backend == "mamba_ssm":
            _mamba_ssm_ops()  # fail at build time, with the install hint


@dataclass
class MambaCache:
    """Decoding state: the last K conv inputs conv_state (B, E, K) and the SSM state ssm_state (B, E, N), fp32."""

    conv_state: Tensor
    ssm_state: Tensor


class Mamba(Mixer):
    """Mamba-1 block: in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> selective SSM; y * silu(z) -> out_proj.

    Per channel e and state n, with input-dependent dt, B, C (the selection mechanism, Algorithm 2):

        dt_t = softplus(dt_proj(x_proj(x_t)[:R]))     B_t, C_t = x_proj(x_t)[R:R+N], x_proj(x_t)[R+N:]
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,     y_t = C_t . h_t + D x_t

    with A = -exp(A_log) < 0 diagonal (S4D-real init, A[n] = -(n + 1)). Training and prefill run the
    chunked parallel scan; decoding runs the recurrence one token at a time. `cfg.backend` picks the kernels
    (see BACKENDS); auto runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere.
    """

    def __init__(self, d_model: int, cfg: MambaConfig):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"mamba: d_model must be >= 1, got {d_model}")
        self.d_inner = cfg.expand * d_model
        self.d_state, self.d_conv = cfg.d_state, cfg.d_conv
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.chunk_size = cfg.chunk_size
        self.backend = cfg.backend
        self._train_scan: dict[tuple, str] = {}  # backend=auto: the scan measured faster, per training shape
        E, N, R = self.d_inner, cfg.d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * E, bias=cfg.bias)  # -> x, z
        # causal through blocks.conv.causal_conv1d; padding K-1 only keeps mamba-ssm's module layout
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # -> dt (low rank), B, C
        self.dt_proj = nn.Linear(R, E, bias=True)

        # dt_proj keeps dt at init in [dt_min, dt_max]: small weights, and a bias = softplus^{-1}(dt)
        # for dt log-uniform in that range
        dt_init_std = R**-0.5 * cfg.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(E) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # a model-wide re-init must not undo this

        A_EN = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # S4D-real
        self.A_log = nn.Parameter(torch.log(A_EN))
        self.D = nn.Parameter(torch.ones(E))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(E, d_model, bias=cfg.bias)

    def _ssm_inputs(self, x_BLE: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (..., E) -> dt (..., E) before bias and softplus, B (..., N), C (..., N), A (E, N) fp32."""
        dt, B, C = self.x_proj(x_BLE).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # the dt bias is added in fp32 inside the scan, before the softplus
        return F.linear(dt, self.dt_proj.weight), B, C, -torch.exp(self.A_log.float())

    def _backend(self, x: Tensor) -> str:
        if self.backend == "auto":  # the kernels keep an fp32 state: fp64 runs stay on the reference
            return "triton" if use_triton(x) and x.dtype != torch.float64 else "torch"
        return self.backend

    def _conv(self, x_BEL: Tensor, cache: MambaCache | None, backend: str) -> Tensor:
        """SiLU(causal depthwise conv(x)); the fused kernels take the training path, the reference the cache."""
        if cache is None and backend != "torch":
            conv_fn = _mamba_ssm_ops()[1] if backend == "mamba_ssm" else None
            if conv_fn is not None:
                return conv_fn(x_BEL, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
            return causal_conv1d_triton(x_BEL, self.conv1d.weight[:, 0], self.conv1d.bias, silu=True)
        return F.silu(causal_conv1d(x_BEL, self.conv1d, None if cache is None else cache.conv_state))

    def forward(self, x_BLD: Tensor, cache: MambaCache | None = None) -> Tensor:
        backend = self._backend(x_BLD)
        train_key = (tuple(x_BLD.shape), x_BLD.dtype)
        if backend == "triton" and cache is None and FUSED_INNER and torch.is_grad_enabled() and (
            self.backend == "triton" or scan_backend.mamba_ssm_scan() is None  # auto: nothing to time against
            or self._train_scan.get(train_key) == "triton"  # auto: Triton's scan measured faster for this shape
        ):  # training: conv, projections and scan as one autograd function (fewer passes in the backward)
            y_BLE = mamba_inner_triton(
                self.in_proj(x_BLD), self.conv1d.weight[:, 0], self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D,
            )
            return self.out_proj(y_BLE)
        x_BLE, z_BLE = self.in_proj(x_BLD).chunk(2, dim=-1)
        x_BEL = self._conv(x_BLE.transpose(1, 2), cache, backend)

        dt_BLE, B_BLN, C_BLN, A_EN = self._ssm_inputs(x_BEL.transpose(1, 2))
        args = (x_BEL, dt_BLE.transpose(1, 2), A_EN, B_BLN.transpose(1, 2), C_BLN.transpose(1, 2))
        kw = dict(D=self.D.float(), z=z_BLE.transpose(1, 2), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        if backend == "triton" and self.backend == "auto" and cache is None:  # mamba-ssm's scan takes no state
            backward = torch.is_grad_enabled() and self.in_proj.weight.requires_grad
            backend = choose_scan_backend(args, kw, backward, selective_scan_triton)
            if backward:  # the composed path measured the scans; later training steps may take the fused one
                self._train_scan[train_key] = backend
        if backend == "mamba_ssm" and cache is None:  # its scan takes no initial state
            y_BEL = _mamba_ssm_ops()[0](*args, **kw)
        else:
            initial_state = None if cache is None else cache.ssm_state
            if backend == "torch":
                y_BEL, state_BEN = selective_scan_chunked(
                    *args, **kw, initial_state=initial_state, return_last_state=True, chunk_size=self.chunk_size
                )
            else:
                y_BEL, state_BEN = selective_scan_triton(*args, **kw, initial_state=initial_state, return_last_state=True)
            if cache is not None:
                cache.ssm_state.copy_(state_BEN)
        return self.out_proj(y_BEL.transpose(1, 2))

    def step(self, x_BD: Tensor, cache: MambaCache) -> Tensor:
        fused = self._backend(x_BD) != "torch"  # decoding runs our step kernels for triton and mamba_ssm alike
        x_BE, z_BE = self.in_proj(x_BD).chunk(2, dim=-1)
        if fused:
            x_BE = causal_conv1d_step_triton(x_BE, cache.conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, silu=True)
        else:
            x_BE = F.silu(causal_conv1d_step(x_BE, self.conv1d, cache.conv_state))

        dt_BE, B_BN, C_BN, A_EN = self._ssm_inputs(x_BE)
        y_BE = (selective_state_step_triton if fused else selective_state_step)(
            cache.ssm_state, x_BE, dt_BE, A_EN, B_BN, C_BN, D=self.D.float(), z=z_BE,
            dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
        )
        return self.out_proj(y_BE)

    def allocate_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MambaCache:
        """Zeroed state; its size does not depend on max_len (that is the point of an SSM)."""
        device = device or self.in_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return MambaCache(conv_state, ssm_state)
