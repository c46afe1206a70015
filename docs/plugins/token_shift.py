"""A token-shift mixer, as a plug-in: each position sees itself and the previous one (the shift of RWKV's
time mixing, Peng et al. 2023, without its recurrence).

    python run.py --plugin docs/plugins/token_shift.py mixer=token_shift mixer.expand=4
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks import register_mixer
from blocks.mixer import Mixer


@dataclass
class TokenShiftConfig:
    expand: int = 2  # hidden width = expand * d_model


@register_mixer("token_shift", TokenShiftConfig)
class TokenShift(Mixer):
    """y_t = W_out silu(W_in [x_t; x_{t-1}]), x_{-1} = 0. The recurrent state is the last input token."""

    def __init__(self, d_model: int, cfg: TokenShiftConfig):
        super().__init__()
        self.d_model = d_model
        self.in_proj = nn.Linear(2 * d_model, cfg.expand * d_model, bias=False)
        self.out_proj = nn.Linear(cfg.expand * d_model, d_model, bias=False)

    def _mix(self, x, prev):
        return self.out_proj(F.silu(self.in_proj(torch.cat([x, prev.to(x.dtype)], dim=-1))))

    def forward(self, x_BLD, cache=None):
        first_BD = cache["last"] if cache is not None else x_BLD.new_zeros(x_BLD.shape[0], self.d_model)
        prev_BLD = torch.cat([first_BD[:, None].to(x_BLD.dtype), x_BLD[:, :-1]], dim=1)
        if cache is not None:
            cache["last"].copy_(x_BLD[:, -1])
        return self._mix(x_BLD, prev_BLD)

    def step(self, x_BD, cache):
        y_BD = self._mix(x_BD, cache["last"])
        cache["last"].copy_(x_BD)
        return y_BD

    def allocate_cache(self, batch_size, max_len, device=None, dtype=None):
        return {"last": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)}
