"""Grouped GEMMs over rows sorted by expert, with the MoE gather and scatter fused in (after ScatterMoE,
Tan et al. 2024, arXiv 2403.08245).

Shapes: P sorted rows (grouped by expert, `offsets_E1` their starts), E experts, K reduction width,
N output width. Optional row maps turn the sorted row p into the row actually read or written:

    gmm:        Y[y_rows[p]] = scale[p] * A[a_rows[p]] @ W[e(p)]        W (E, K, N), any strides
    gmm_wgrad:  dW[e] = sum over p in group e of A[a_rows[p]]^T G[p]

so the first expert projection reads token rows in place (no gathered copy of x), the second writes
its weighted output straight to slot order (no separate scatter), and the weight gradients read the
same rows through the same maps. A tile never straddles two experts: the M tiles of expert e are
ceil(count_e / BLOCK_M) consecutive tile indices, found in-kernel from the offsets, so the grid is a
fixed upper bound (cdiv(P, BLOCK_M) + E tiles) and nothing is read back to the host.
Accumulation is fp32; inputs are cast to W's dtype as they are loaded (so fp32 activations under
bf16 autocast are converted inside the kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting
from blocks.kernels.glu import glu_gate


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _configs(shapes: list[tuple[int, int, int, int, int]], **extra: int) -> list[triton.Config]:
    # the last shape is the small tile used under the interpreter, and only there
    shapes = shapes[-1:] if interpreting() else shapes[:-1]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **extra}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


# Hopper-friendly tiles (wgmma wants BLOCK_M a multiple of 64 and 4 or 8 warps)
GMM_CONFIGS = _configs([
    (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
    (16, 16, 16, 1, 1),
], GROUP_M=8)
# wgrad tiles: (BLOCK_M = rows reduced per step, BLOCK_N, BLOCK_K); the output tile is BLOCK_K x BLOCK_N
WGRAD_CONFIGS = _configs([
    (64, 128, 128, 4, 8), (64, 256, 128, 3, 8), (32, 256, 128, 4, 8), (64, 128, 128, 3, 4), (128, 128, 128, 3, 8),
    (64, 128, 256, 3, 8), (32, 128, 128, 4, 4), (64, 128, 128, 4, 4),
    (16, 16, 16, 1, 1),
])


@triton.jit
def _mapped_rows(map_ptr, rows, row_ok, MAPPED: tl.constexpr):
    """map[rows] as int64 row indices when MAPPED, else the rows themselves."""
    if MAPPED:
        return tl.load(map_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _expert_of_tile(offsets_ptr, tile_m, E, BLOCK_M: tl.constexpr, EP: tl.constexpr):
    """(expert, first row, end row) of M tile `tile_m`; expert == E for a tile past the last group."""
    e_idx = tl.arange(0, EP)
    starts = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0)
    ends = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    cum = tl.cumsum(tiles, axis=0)  # tiles of experts 0..e inclusive
    e = tl.sum((cum <= tile_m).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(e_idx == e, cum - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(e_idx == e, starts, 0), axis=0) + (tile_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(e_idx == e, ends, 0), axis=0)
    return e, row0, row_end


def _prune_glu(configs, named_args, **kwargs):
    # the fused-GLU variant holds two accumulators: keep the tiles whose pair fits in registers
    if (kwargs.get("GLU") or named_args.get("GLU", 0)) and not interpreting():
        return [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] <= 128 * 128]
    return configs


@triton.autotune(configs=GMM_CONFIGS, key=["N", "K", "GATHER_A", "SCATTER_Y", "SCALE", "GLU"],
                 prune_configs_by={"early_config_prune": _prune_glu})
@triton.jit
def _gmm_kernel(
    a_ptr, w_ptr, y_ptr, offsets_ptr, a_rows_ptr, y_rows_ptr, scale_ptr, act_ptr,
    P, N, K, E,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    GATHER_A: tl.constexpr, SCATTER_Y: tl.constexpr, SCALE: tl.constexpr, GLU: tl.constexpr, EP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(P, BLOCK_M) + E
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M consecutive M tiles sweep the N tiles together, so A tiles stay in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    tile_n = (pid % (GROUP_M * num_n)) // size_m

    e, row0, row_end = _expert_of_tile(offsets_ptr, tile_m, E, BLOCK_M, EP)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    a_rows = _mapped_rows(a_rows_ptr, rows, row_ok, GATHER_A)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GLU:  # W has 2N columns: gate half [0, N), up half [N, 2N); this tile computes both
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc)
        if GLU:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
            acc_up = tl.dot(a.to(w.dtype), w_up, acc_up)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GLU:  # store h = [gate | up] for the backward, and act = g(gate) * up for the next GEMM
        out_ok = row_ok[:, None] & (cols[None, :] < N)
        h_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(h_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        tl.store(h_ptrs + N * stride_yn, acc_up.to(y_ptr.dtype.element_ty), mask=out_ok)
        act = glu_gate(acc.to(y_ptr.dtype.element_ty).to(tl.float32), GLU == 2) * acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=out_ok)
        return
    if SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    y_rows = _mapped_rows(y_rows_ptr, rows, row_ok, SCATTER_Y)
    y_ptrs = y_ptr + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.autotune(configs=WGRAD_CONFIGS, key=["N", "K", "GATHER_A", "DOT_DTYPE"])
@triton.jit
def _wgrad_kernel(
    a_ptr, g_ptr, dw_ptr, offsets_ptr, a_rows_ptr,
    N, K, E,
    stride_am, stride_ak, stride_gm, stride_gn, stride_de, stride_dk, stride_dn,
    GATHER_A: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per (expert, K tile, N tile) of dW; it reduces over the expert's rows in BLOCK_M steps
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    e = pid // (num_k * num_n)
    tile = pid % (num_k * num_n)
    tile_k = tile // num_n
    tile_n = tile % num_n
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = _mapped_rows(a_rows_ptr, rows, row_ok, GATHER_A)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + ns[None, :] * stride_gn,
                    mask=row_ok[:, None] & (ns[None, :] < N), other=0.0)
        acc = tl.dot(tl.trans(a.to(DOT_DTYPE)), g.to(DOT_DTYPE), acc)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_de + ks[:, None] * stride_dk + ns[None, :] * stride_dn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (ns[None, :] < N))


def gmm(
    a: Tensor,
    w: Tensor,
    offsets_E1: Tensor,
    num_rows: int,
    *,
    a_rows: Tensor | None = None,
    out: Tensor | None = None,
    y_rows: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """Y[y_rows[p]] = scale[p] * (A[a_rows[p]] @ W[e(p)]) for the `num_rows` (= P) sorted rows.

    a (M, K) any float dtype; w (E, K, N), any strides (pass w.transpose(1, 2) for W^T);
    a_rows, y_rows (P,) int32 row maps (None: identity); scale (P,) fp32; out: the output to write
    (rows outside the groups are left as they are), else a new (P, N) tensor of w's dtype."""
    E, K, N = w.shape
    assert a.shape[1] == K, (a.shape, w.shape)
    if out is None:
        out = torch.empty(num_rows, N, dtype=w.dtype, device=w.device)
    if num_rows == 0:
        return out
    dummy = offsets_E1
    grid = lambda meta: ((triton.cdiv(num_rows, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gmm_kernel[grid](
        a, w, out, offsets_E1,
        a_rows if a_rows is not None else dummy, y_rows if y_rows is not None else dummy,
        scale if scale is not None else dummy, dummy,
        num_rows, N, K, E,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        GATHER_A=a_rows is not None, SCATTER_Y=y_rows is not None, SCALE=scale is not None, GLU=0,
        EP=triton.next_power_of_2(E),
    )
    return out


def gmm_glu(a: Tensor, w: Tensor, offsets_E1: Tensor, num_rows: int, activation: str, *, a_rows: Tensor | None = None
            ) -> tuple[Tensor, Tensor]:
    """The first expert projection with the GLU in its epilogue: h = A[a_rows[p]] @ W[e(p)] (P, 2F) and
    act = g(h[:, :F]) * h[:, F:] (P, F), both in w's dtype (act from the rounded h, as glu_fwd would).
    One pass instead of a GEMM followed by an activation kernel that re-reads h."""
    E, K, F2 = w.shape
    F = F2 // 2
    h = torch.empty(num_rows, F2, dtype=w.dtype, device=w.device)
    act = torch.empty(num_rows, F, dtype=w.dtype, device=w.device)
    if num_rows == 0:
        return h, act
    grid = lambda meta: ((triton.cdiv(num_rows, meta["BLOCK_M"]) + E) * triton.cdiv(F, meta["BLOCK_N"]),)  # noqa: E731
    _gmm_kernel[grid](
        a, w, h, offsets_E1, a_rows if a_rows is not None else offsets_E1, offsets_E1, offsets_E1, act,
        num_rows, F, K, E,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), h.stride(0), h.stride(1),
        GATHER_A=a_rows is not None, SCATTER_Y=False, SCALE=False, GLU={"swiglu": 1, "geglu": 2}[activation],
        EP=triton.next_power_of_2(E),
    )
    return h, act


def gmm_wgrad(
    a: Tensor,
    g: Tensor,
    offsets_E1: Tensor,
    *,
    a_rows: Tensor | None = None,
    compute_dtype: torch.dtype,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """dW[e] = sum over rows p of group e of A[a_rows[p]]^T G[p]: (E, K, N) in `dtype`.

    a (M, K), g (P, N) sorted rows; a_rows as in `gmm`; both are cast to `compute_dtype` for the
    products (fp32 accumulation). An expert with no rows gets a zero gradient."""
    E = offsets_E1.numel() - 1
    K, N = a.shape[1], g.shape[1]
    dw = torch.empty(E, K, N, dtype=dtype, device=a.device)
    dummy = offsets_E1
    grid = lambda meta: (E * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _wgrad_kernel[grid](
        a, g, dw, offsets_E1,
        a_rows if a_rows is not None else dummy,
        N, K, E,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        GATHER_A=a_rows is not None, DOT_DTYPE=_TL_DTYPES[compute_dtype],
    )
    return dw
