"""The SSD scan of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060), in pure PyTorch.

Per head h, with a scalar decay A_h < 0 and B, C shared by the H/G heads of a group:

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        state h_t: (P, N)
    y_t = h_t C_t + D_h x_t

`ssd_ref` runs this recurrence token by token; `ssd_chunked` computes the same thing with the
chunked SSD algorithm (paper Sec. 6): a masked attention-like product inside each chunk of Q
tokens and the recurrence only across chunk boundaries. `ssd_step` is one token of decoding.

Shapes: B batch, L length, H heads, P head dim, G groups (H % G == 0), N state size,
C number of chunks, Q chunk length, R = H // G heads per group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor | None) -> None:
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    if length < 1:
        raise ValueError("the sequence must hold at least one token")
    if dt.shape != (batch, length, nheads) or A.shape != (nheads,):
        raise ValueError(
            f"x is {tuple(x.shape)}: dt must be (B, L, H), A (H,);"
            f" got {tuple(dt.shape)}, {tuple(A.shape)}"
        )
    if B.shape != C.shape or B.shape[:2] != (batch, length) or nheads % ngroups:
        raise ValueError(
            f"B and C must be (B, L, G, N) with G dividing H={nheads};"
            f" got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    if state is not None and state.shape != (batch, nheads, headdim, dstate):
        raise ValueError(
            f"initial_state must be {(batch, nheads, headdim, dstate)} (B, H, P, N);"
            f" got {tuple(state.shape)}"
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    # The state is accumulated in fp32 (fp64 stays fp64 so gradcheck sees exact math).
    return torch.promote_types(x.dtype, torch.float32)


def _step(
    state_BHPN: Tensor, x_BHP: Tensor, dt_BH: Tensor, A_H: Tensor, B_BGN: Tensor, C_BGN: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence, out of place: returns (new state, y without the D skip)."""
    reps = x_BHP.shape[1] // B_BGN.shape[1]
    B_BHN = B_BGN.repeat_interleave(reps, dim=1)  # head h reads group h // reps
    C_BHN = C_BGN.repeat_interleave(reps, dim=1)
    dA_BH = torch.exp(dt_BH * A_H)  # dt >= 0, A < 0: always <= 1
    dBx_BHPN = (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :]
    state_BHPN = state_BHPN * dA_BH[..., None, None] + dBx_BHPN
    y_BHP = torch.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN)
    return state_BHPN, y_BHP


def ssd_step(
    state_BHPN: Tensor, x_BHP: Tensor, dt_BH: Tensor, A_H: Tensor, B_BGN: Tensor, C_BGN: Tensor,
    D_H: Tensor | None = None,
) -> Tensor:
    """Advance `state_BHPN` (fp32, updated in place) by one token and return y_BHP in x's dtype."""
    cdt = state_BHPN.dtype
    new_state, y_BHP = _step(state_BHPN, x_BHP.to(cdt), dt_BH.to(cdt), A_H.to(cdt), B_BGN.to(cdt), C_BGN.to(cdt))
    state_BHPN.copy_(new_state)
    if D_H is not None:
        y_BHP = y_BHP + D_H.to(cdt)[:, None] * x_BHP.to(cdt)
    return y_BHP.to(x_BHP.dtype)


def ssd_ref(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    initial_state: Tensor | None = None, return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference: the recurrence above, one Python iteration per token, fp32 state.

    x (B, L, H, P), dt (B, L, H) already softplus'ed, A (H,) negative, B and C (B, L, G, N),
    D (H,), initial_state (B, H, P, N). Returns y (B, L, H, P) [and the final state (B, H, P, N)].
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    batch, length, nheads, headdim = x.shape
    cdt = _compute_dtype(x)
    x_c, dt_c, A_c, B_c, C_c = (t.to(cdt) for t in (x, dt, A, B, C))
    if initial_state is None:
        state_BHPN = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=cdt)
    else:
        state_BHPN = initial_state.to(cdt)
    ys = []
    for t in range(length):
        state_BHPN, y_BHP = _step(state_BHPN, x_c[:, t], dt_c[:, t], A_c, B_c[:, t], C_c[:, t])
        ys.append(y_BHP)
    y_BLHP = torch.stack(ys, dim=1)
    if D is not None:
        y_BLHP = y_BLHP + D.to(cdt)[:, None] * x_c
    y_BLHP = y_BLHP.to(x.dtype)
    return (y_BLHP, state_BHPN) if return_last_state else y_BLHP


def segsum(a_TQ: Tensor) -> Tensor:
    """Stable segment sum: out[..., i, j] = sum_{k=j+1..i} a[..., k] for i >= j, -inf above the diagonal.

    Built with a cumulative sum of masked copies instead of cumsum(a)[i] - cumsum(a)[j], which
    would cancel catastrophically once the running sum of dt*A grows large. exp(out) is then the
    lower-triangular decay matrix of the chunk, every entry in [0, 1].
    """
    q = a_TQ.shape[-1]
    causal_QQ = torch.ones(q, q, dtype=torch.bool, device=a_TQ.device).tril()
    a_TQQ = a_TQ[..., :, None].expand(*a_TQ.shape, q).tril(-1)  # row i, col j: a[i] if i > j
    return a_TQQ.cumsum(dim=-2).masked_fill(~causal_QQ, float("-inf"))


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    initial_state: Tensor | None = None, return_last_state: bool = False, chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """The chunked SSD algorithm; same contract as `ssd_ref`, any L (padded to whole chunks inside).

    Within a chunk, y = (L o C B^T) (dt x) with L[i, j] = exp(sum_{k=j+1..i} dt_k A) (the
    1-semiseparable mask of Sec. 3); each chunk's contribution to the state, decayed to the chunk end, is
    carried across chunks by the recurrence S_{c+1} = exp(sum_chunk dt A) S_c + states_c, and read
    back with the decay from the chunk start. All exponents are sums of dt*A <= 0.
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    reps = nheads // ngroups
    cdt = _compute_dtype(x)
    q = max(1, min(chunk_size, length))  # a short prompt is one short chunk, not one padded to 64
    pad = -length % q
    nchunks = (length + pad) // q

    # dt = 0 on padded tokens: no input and a decay of exp(0) = 1, so the final state is exact.
    x_c, dt_c, B_c, C_c = (F.pad(t.to(cdt), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    x_BCQGRP = x_c.view(batch, nchunks, q, ngroups, reps, headdim)
    dt_BCQGR = dt_c.view(batch, nchunks, q, ngroups, reps)
    B_BCQGN = B_c.view(batch, nchunks, q, ngroups, dstate)
    C_BCQGN = C_c.view(batch, nchunks, q, ngroups, dstate)

    a_BCGRQ = (dt_BCQGR * A.to(cdt).view(ngroups, reps)).permute(0, 1, 3, 4, 2)
    a_cs_BCGRQ = a_BCGRQ.cumsum(dim=-1)  # decay from the chunk start through token i
    L_BCGRQQ = torch.exp(segsum(a_BCGRQ))
    xdt_BCQGRP = x_BCQGRP * dt_BCQGR[..., None]

    # 1. intra-chunk (diagonal blocks): masked "attention" C_i . B_j L[i, j] over j <= i.
    CB_BCGQQ = torch.einsum("bcign,bcjgn->bcgij", C_BCQGN, B_BCQGN)
    M_BCGRQQ = CB_BCGQQ[:, :, :, None] * L_BCGRQQ
    y_diag_BCQGRP = torch.einsum("bcgrij,bcjgrp->bcigrp", M_BCGRQQ, xdt_BCQGRP)

    # 2. each chunk's own state at its end: inputs decayed by L[Q-1, j] = exp(sum_{k>j} dt_k A).
    decay_to_end_BCQGR = L_BCGRQQ[..., -1, :].permute(0, 1, 4, 2, 3)
    states_BCGRPN = torch.einsum("bcjgrp,bcjgn->bcgrpn", xdt_BCQGRP * decay_to_end_BCQGR[..., None], B_BCQGN)

    # 3. inter-chunk recurrence over chunk boundaries (C steps, not L).
    chunk_decay_BCGR = torch.exp(a_cs_BCGRQ[..., -1])
    if initial_state is None:
        state_BGRPN = x_c.new_zeros(batch, ngroups, reps, headdim, dstate)
    else:
        state_BGRPN = initial_state.to(cdt).reshape(batch, ngroups, reps, headdim, dstate)
    entering = []
    for decay_BGR, new_BGRPN in zip(chunk_decay_BCGR.unbind(1), states_BCGRPN.unbind(1)):  # unbind: one backward op
        entering.append(state_BGRPN)
        state_BGRPN = state_BGRPN * decay_BGR[..., None, None] + new_BGRPN
    entering_BCGRPN = torch.stack(entering, dim=1)

    # 4. the carried-in state read at token i, decayed from the chunk start: exp(sum_{k<=i} dt_k A).
    y_off_BCQGRP = torch.einsum("bcign,bcgrpn->bcigrp", C_BCQGN, entering_BCGRPN)
    y_off_BCQGRP = y_off_BCQGRP * torch.exp(a_cs_BCGRQ).permute(0, 1, 4, 2, 3)[..., None]

    y_BLHP = (y_diag_BCQGRP + y_off_BCQGRP).reshape(batch, nchunks * q, nheads, headdim)[:, :length]
    if D is not None:
        y_BLHP = y_BLHP + D.to(cdt)[:, None] * x_c[:, :length]
    y_BLHP = y_BLHP.to(x.dtype)
    if return_last_state:
        return y_BLHP, state_BGRPN.reshape(batch, nheads, headdim, dstate)
    return y_BLHP
