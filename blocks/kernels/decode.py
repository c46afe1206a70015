"""Triton kernels of the one-token decoding step, fused across module boundaries (used by blocks/fused_step.py).

At batch 1 a decoding step is bound by kernel count, not by bytes: each small op costs a launch of a few
microseconds whatever it reads. These kernels fold the steps of one block that run back to back:

  norm_in_proj_conv      RMSNorm(residual) -> in_proj -> (x: conv state shift, depthwise conv, SiLU; z)
  linear_residual_       residual += x @ W^T                       (out_proj, in place on the fp32 residual)
  norm_gate              h = RMSNorm(residual) in the weights' dtype, router logits = h W_g^T + b_g in fp32
                         (and for a top-1 router with a sigmoid or softmax gate, its choice and weight)
  expert_glu_up          a_s = glu(h_t @ w_in[e_s])                 one row per routed slot s
  route_glu_up           norm_gate + expert_glu_up for one token and a top-1 router (every program routes)
  expert_down_residual_  residual_t += sum_k g_tk a_tk @ w_out[e_tk]
                         (both split their reduction over SPLIT programs, see below)
  gated_glu              a_t = [g_te glu(up_et)]_e               (from one slot per expert: every expert's GLU
                                                                  output scaled by the gate weights)
  x_proj_split_k         parts[s] = x[:, K_s] @ W_x[:, K_s]^T      (x_proj in fp32 partial sums over slices K_s
                                                                  of the inputs: ~100 programs, not 13)
  dt_proj_ssm_step       (dt_low, B, C) = sum_s parts[s]; dt = dt_low @ W_dt^T; the SSM update and gate
                                                                  (blocks.kernels.ssm_step's math)

On Hopper and later GPUs the kernels are launched with programmatic dependent launch (PDL): once all programs
of a kernel have their inputs (past gdc_wait), the next kernel may start, and it loads its weights (which no
kernel of a step writes) before it waits for its predecessor's results in turn; nothing a predecessor produces
is read or written before the wait. It overlaps launches with the kernel before; at batch 1 on an H200 that
measured 1% of a step (benchmarks/RESULTS.md): the matrix-vector kernels, not the gaps, take the time.

L2 prefetch (batch 1): one token's matrix-vector kernel waits on HBM latency with too few loads in flight to
fill the bandwidth. So a kernel also pulls the weights of a kernel after it into L2 (`prefetch.global.L2`, one
128-byte line per thread at a time, each program its share): the MoE block's expert down projection pulls the
next Mamba block's in_proj, the Mamba block's norm + in_proj kernel its out_proj, and the routed expert's up
kernel, once it has routed, that expert's down projection, so that those kernels find their weights in L2
(what it gains is not yet measured: benchmarks/RESULTS.md). A prefetch writes nothing and returns nothing, so
results do not depend on it.

Their PyTorch twins are the modules' own steps (blocks.model.MixerBlock.step, MLPBlock.step): the reference
functions at the end of this file spell out the same math with torch ops, and the tests compare the two.
Shapes: M rows (the batch), D model width, E d_inner (Mamba) or experts (MoE), K conv width, S slots, F expert width.

Split reductions: one routed expert's projection has only 1,152 or 3,072 outputs, too few blocks of outputs to
give every SM loads to wait on, so the routed-expert kernels also split their inputs over SPLIT programs. Each
writes its fp32 partial sums, then counts itself in on a counter of its output block; the program that arrives
last adds the partials in split order (the result does not depend on which program came last), finishes the
block (GLU, or the gated add into the residual) and resets the counter for the next launch.

A projection tile is [BLOCK_M rows, BLOCK_N outputs] over BLOCK_K inputs: tl.dot when BLOCK_M >= 16, else
(batch 1) a broadcast multiply and row sum over an unrolled loop, so that all of a program's loads are in
flight together (a one-token step waits on load latency far more than on bandwidth). The reduction sizes are
compile-time constants for that reason; a model has one or two of them.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from blocks.kernels import interpreting
from blocks.kernels.glu import glu_gate
from blocks.mlp import glu_activation
from blocks.moe_decode import gated_glu_torch


PDL = True  # launch with programmatic dependent launch where the GPU and Triton have it (benchmarks toggle it)
PREFETCH = True  # batch-1 kernels pull a later kernel's weights into L2 (on CUDA only; benchmarks toggle it)


@functools.cache
def _gdc_supported(device_index: int) -> bool:
    """Triton can launch with PDL (launch_pdl, gdc_wait) and the GPU is sm90 or later."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        import triton.language.extra.cuda as tl_cuda
    except ImportError:
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return ("launch_pdl" in fields and hasattr(tl_cuda, "gdc_wait")
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def _pdl(t: Tensor) -> bool:
    """Whether kernels on t's device run with PDL (never under the interpreter)."""
    return PDL and t.is_cuda and not interpreting() and _gdc_supported(t.device.index or 0)


@triton.jit
def _gdc_wait(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible; then let the next
    kernel launch (its programs only load weights until they pass their own wait). Letting it launch from
    the start instead would cascade: every PDL kernel of the step could be resident at once."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


_LINE = 128  # bytes of an L2 cache line


def _pf_args(w: Tensor | None, like: Tensor, tiles: dict, numel: int | None = None) -> dict:
    """The kernel arguments that make its programs pull w's bytes (its first numel elements with numel) into
    L2: pf_ptr, pf_lines, the PF flag, PF_STEP (elements a line) and PF_BLOCK (lines a program issues at a
    time: one a thread). PF is off without w, for a w whose bytes are not one run (not contiguous), off the
    GPU and under the interpreter."""
    if w is None or not w.is_contiguous() or not (PREFETCH and like.is_cuda and not interpreting()):
        return dict(pf_ptr=like, pf_lines=0, PF=False, PF_STEP=1, PF_BLOCK=1)
    n = w.numel() if numel is None else numel
    return dict(pf_ptr=w, pf_lines=triton.cdiv(n * w.element_size(), _LINE), PF=True,
                PF_STEP=_LINE // w.element_size(), PF_BLOCK=32 * tiles.get("num_warps", 4))


@triton.jit
def _prefetch_l2(ptr, n_lines, PF_STEP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of n_lines cache lines from ptr (PF_STEP elements a line) into L2. Each program
    of the grid takes a contiguous run of lines, BLOCK at a time (one a thread); the clamped tail may name a
    line twice, which costs nothing."""
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    n_prog = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    per = tl.cdiv(n_lines, n_prog)
    lo = pid * per
    hi = tl.minimum(lo + per, n_lines)
    for i in range(lo, hi, BLOCK):
        line = tl.minimum(i + tl.arange(0, BLOCK), hi - 1).to(tl.int64)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptr + line * PF_STEP],
                                  dtype=tl.int32, is_pure=False, pack=1)


def _block_m(rows: int) -> int:
    return 1 if rows == 1 else min(64, max(16, triton.next_power_of_2(rows)))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 weights are multiplied in fp32 (Triton's default for fp32 dots is TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# (BLOCK_N, BLOCK_K, num_warps) per kernel: "row" at batch 1, "dot" from 16 rows (also num_stages), measured
# on an H200 at the 1.5B preset's shapes with benchmarks/bench_decode.py (which sets these to sweep them; the
# split kernels' settings with weights read from HBM, not L2, as in a model's step).
# For the expert kernels BLOCK_N is the output block (F for expert_up, D for expert_down), BLOCK_K the
# reduction block and a fourth entry SPLIT the number of programs a reduction is split over; norm_gate uses
# only BLOCK_K and num_warps.
TILES = {
    "in_proj": {"row": (8, 512, 4), "dot": (32, 64, 4, 3)},
    "out_proj": {"row": (8, 512, 4, 4), "dot": (16, 256, 4, 3)},
    "gate": {"row": (0, 2048, 8)},
    "expert_up": {"row": (128, 256, 4, 8)},
    "expert_down": {"row": (128, 256, 4, 8)},
    "x_proj": {"row": (8, 256, 2)},  # BLOCK_K is the width of one slice K_s of the inputs
    "ssm": {"row": (16, 0, 2)},  # BLOCK_N channels a program
}


def _tiles(rows: int, kernel: str) -> dict:
    """BLOCK_M/N/K and the launch settings: at one row the reduction loop is unrolled (its loads all in
    flight at once: a one-token step is bound by load latency, not bandwidth); from 16 rows tl.dot tiles
    with a pipelined loop. Under the interpreter: tiny blocks, no launch settings."""
    bm = _block_m(rows)
    if interpreting():  # split reductions in two where a kernel can split them, to test the split path
        return dict(BLOCK_M=bm, BLOCK_N=16, BLOCK_K=16) | ({"SPLIT": 2} if len(TILES[kernel]["row"]) > 3 else {})
    if bm == 1:
        bn, bk, warps, *split = TILES[kernel]["row"]
        return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps) | ({"SPLIT": split[0]} if split else {})
    bn, bk, warps, stages = TILES[kernel]["dot"]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def _pdl_launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def _launch(tiles: dict, pdl: bool = False) -> dict:
    """The launch settings among _tiles' entries (none under the interpreter), for kernels that take their
    block sizes under their own names; launch_pdl with PDL."""
    return {k: tiles[k] for k in ("num_warps", "num_stages") if k in tiles} | _pdl_launch(pdl)


_COUNTERS: dict = {}


def _counters(device: torch.device, kernel: str, n: int) -> Tensor:
    """n int32 arrival counters for a split kernel, zero between launches (the last arrival resets its own),
    kept per device and kernel. Launches on one stream never overlap on them: a program counts in only after
    its gdc_wait, when the kernel launched before it has finished (two streams at once could). Allocated at a kernel's first launch,
    which a decoder's warm-up runs before it captures the step (an allocation inside a CUDA-graph capture
    would not be replayed)."""
    key = (device.type, device.index, kernel)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{kernel}: its counters must be allocated before CUDA-graph capture; run one "
                               "step eagerly first (experiments.cuda_graphs.StaticDecoder warms up for this)")
        c = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def _split(n_in: int, tiles: dict) -> tuple[int, int]:
    """(inputs a program reduces over, a multiple of BLOCK_K; programs a reduction is split over)."""
    chunk = triton.cdiv(triton.cdiv(n_in, tiles.get("SPLIT", 1)), tiles["BLOCK_K"]) * tiles["BLOCK_K"]
    return chunk, triton.cdiv(n_in, chunk)


@triton.jit
def _arrived_last(cnt_ptr, SPLIT: tl.constexpr):
    """Count this program in on its output block's counter, after all its threads have stored their partials;
    True in the last of the SPLIT programs, which also resets the counter. The acquire-release atomic makes
    the other programs' partials visible to it (they are read past L1, .cg, all the same)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _split_total(acc, part_ptr, cnt_ptr, group, sp, SPLIT: tl.constexpr):
    """A reduction split over SPLIT programs: (whether this program now holds the whole sum, that sum; zeros
    in the others). acc is this program's 2-D fp32 partial; partials are laid out (group, split, acc). SPLIT 1:
    (True, acc)."""
    if SPLIT == 1:
        done = True
        total = acc
    else:
        size = acc.shape[0] * acc.shape[1]
        offs = tl.arange(0, acc.shape[0])[:, None] * acc.shape[1] + tl.arange(0, acc.shape[1])[None, :]
        tl.store(part_ptr + (group * SPLIT + sp) * size + offs, acc)
        done = _arrived_last(cnt_ptr + group, SPLIT)
        total = tl.zeros_like(acc)
        if done:
            for j in tl.static_range(SPLIT):  # in split order, whichever program arrived last
                total += tl.load(part_ptr + (group * SPLIT + j) * size + offs, cache_modifier=".cg")
    return done, total


@triton.jit
def _glu_up_dot(x_ptr, nw_ptr, rstd, w_ptr, f, f_ok, F, k_lo, s_wd, s_wf,
                Dm: tl.constexpr, NORM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    """(gate, up) fp32 sums of one expert's input projection, outputs f, over inputs k_lo .. k_lo + CHUNK of
    the row at x_ptr (with NORM: the fp32 residual, normed here by rstd and nw and rounded to nw's dtype, as
    norm_gate forms h). Unrolled: every load of the program in flight at once."""
    acc_g = tl.zeros([f.shape[0]], dtype=tl.float32)
    acc_u = tl.zeros([f.shape[0]], dtype=tl.float32)
    for k0 in tl.static_range(0, CHUNK, BLOCK_K):
        kk = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < Dm
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            x = (x * rstd * tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)).to(nw_ptr.dtype.element_ty)
            x = x.to(tl.float32)
        ok = k_ok[:, None] & f_ok[None, :]
        wg = tl.load(w_ptr + kk[:, None] * s_wd + f[None, :] * s_wf, mask=ok, other=0.0)
        wu = tl.load(w_ptr + kk[:, None] * s_wd + (F + f)[None, :] * s_wf, mask=ok, other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * x[:, None], 0)
        acc_u += tl.sum(wu.to(tl.float32) * x[:, None], 0)
    return acc_g, acc_u


@triton.jit
def _load_w(w_ptr, n, n_ok, k0, s_wn, s_wk, Dm: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight block (BLOCK_N, BLOCK_K) of inputs k0 .. k0 + BLOCK_K."""
    kk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + n[:, None] * s_wn + kk[None, :] * s_wk, mask=n_ok[:, None] & (kk < Dm)[None, :], other=0.0)


@triton.jit
def _load_x(res_ptr, nw_ptr, m, m_ok, k0, s_rm, Dm: tl.constexpr, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inputs k0 .. k0 + BLOCK_K: x (BLOCK_M, BLOCK_K) fp32 (times nw, and its rows' sums of squares, with
    NORM; zeros without)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    k_ok = kk < Dm
    x = tl.load(res_ptr + m[:, None] * s_rm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    if NORM:
        ss = tl.sum(x * x, 1)
        x = x * tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    else:
        ss = tl.zeros([x.shape[0]], dtype=tl.float32)
    return x, ss


@triton.jit
def _row_normed_dot(res_ptr, nw_ptr, w_ptr, m, m_ok, n, n_ok, s_rm, s_wn, s_wk, k_lo,
                    Dm: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """(x * nw) @ W^T over the Dm inputs (x the rows at res_ptr; nw = 1 without NORM), and each row's
    sum of squares of x: one pass, so RMSNorm's 1/rms scales the result afterwards (it is one number a row).
    At one row only inputs k_lo .. k_lo + CHUNK (a split reduction; CHUNK >= Dm and k_lo 0 otherwise).
    Waits for the previous kernel (PDL) before reading x; at one row, after loading the first weight block."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    if BLOCK_M == 1:  # unrolled, fp32 products
        w_first = _load_w(w_ptr, n, n_ok, k_lo, s_wn, s_wk, Dm, BLOCK_K)
        _gdc_wait(PDL)
        for k0 in tl.static_range(0, CHUNK, BLOCK_K):
            if k0 == 0:
                w = w_first
            else:
                w = _load_w(w_ptr, n, n_ok, k_lo + k0, s_wn, s_wk, Dm, BLOCK_K)
            x, ss_k = _load_x(res_ptr, nw_ptr, m, m_ok, k_lo + k0, s_rm, Dm, NORM, BLOCK_K)
            ss += ss_k
            acc += tl.sum(w.to(tl.float32) * x, 1)[None, :]
    else:  # tl.dot on the weights' dtype, a pipelined loop
        _gdc_wait(PDL)
        for k0 in range(0, Dm, BLOCK_K):
            w = _load_w(w_ptr, n, n_ok, k0, s_wn, s_wk, Dm, BLOCK_K)
            x, ss_k = _load_x(res_ptr, nw_ptr, m, m_ok, k0, s_rm, Dm, NORM, BLOCK_K)
            ss += ss_k
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PREC)
    return acc, ss


@triton.jit
def _norm_in_conv_kernel(
    res_ptr, nw_ptr, w_ptr, cs_ptr, cw_ptr, cb_ptr, xc_ptr, z_ptr, pf_ptr, pf_lines, M, E, eps,
    s_rm, s_wn, s_wk, s_csb, s_csc, s_csk, s_cwc, s_cwk, s_xm, s_zm,
    Dm: tl.constexpr, KC: tl.constexpr, HAS_CB: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
    PF: tl.constexpr, PF_STEP: tl.constexpr, PF_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    if PF:  # a later kernel's weights (the block's out_proj) into L2
        _prefetch_l2(pf_ptr, pf_lines, PF_STEP, PF_BLOCK)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < 2 * E
    acc, ss = _row_normed_dot(res_ptr, nw_ptr, w_ptr, m, m_ok, n, n_ok, s_rm, s_wn, s_wk, 0,
                              Dm, True, PREC, PDL, BLOCK_M, BLOCK_N, BLOCK_K, Dm)
    acc *= (1.0 / tl.sqrt(ss / Dm + eps))[:, None]
    # x half (n < E): shift x into the conv state and convolve; z half: stored for the SSM's gate
    is_x = n < E
    ok = m_ok[:, None] & (is_x & n_ok)[None, :]
    x_new = acc.to(cs_ptr.dtype.element_ty)  # what the state keeps, as prefill keeps it
    y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_CB:
        y += tl.load(cb_ptr + n, mask=is_x, other=0.0).to(tl.float32)[None, :]
    state = cs_ptr + m[:, None] * s_csb + n[None, :] * s_csc
    for k in tl.static_range(KC):
        if k < KC - 1:
            v = tl.load(state + (k + 1) * s_csk, mask=ok, other=0.0)
        else:
            v = x_new
        tl.store(state + k * s_csk, v, mask=ok)
        y += v.to(tl.float32) * tl.load(cw_ptr + n * s_cwc + k * s_cwk, mask=is_x, other=0.0).to(tl.float32)[None, :]
    y = y * tl.sigmoid(y)
    tl.store(xc_ptr + m[:, None] * s_xm + n[None, :], y.to(xc_ptr.dtype.element_ty), mask=ok)
    z_ok = m_ok[:, None] & (~is_x & n_ok)[None, :]
    tl.store(z_ptr + m[:, None] * s_zm + (n - E)[None, :], acc.to(z_ptr.dtype.element_ty), mask=z_ok)


def norm_in_proj_conv(
    res_MD: Tensor, norm_w: Tensor, eps: float, w_in: Tensor, conv_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    prefetch: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(x, z), each (M, E) in w_in's dtype: x = SiLU(conv step of in_proj(RMSNorm(res))[:, :E]) with the state
    (M, E, K) shifted in place, z = in_proj(...)[:, E:]. res is the fp32 residual (M, D); w_in (2E, D).
    prefetch: a contiguous weight of a later kernel to pull into L2 (see the module docstring)."""
    M, Dm = res_MD.shape
    E = w_in.shape[0] // 2
    x = torch.empty(M, E, device=res_MD.device, dtype=w_in.dtype)
    z = torch.empty_like(x)
    tiles, pdl = _tiles(M, "in_proj"), _pdl(res_MD)
    grid = (triton.cdiv(2 * E, tiles["BLOCK_N"]), triton.cdiv(M, tiles["BLOCK_M"]))
    _norm_in_conv_kernel[grid](
        res_MD, norm_w, w_in, conv_state, conv_w, conv_b, x, z, M=M, E=E, eps=eps,
        s_rm=res_MD.stride(0), s_wn=w_in.stride(0), s_wk=w_in.stride(1), s_csb=conv_state.stride(0),
        s_csc=conv_state.stride(1), s_csk=conv_state.stride(2), s_cwc=conv_w.stride(0), s_cwk=conv_w.stride(1),
        s_xm=x.stride(0), s_zm=z.stride(0),
        Dm=Dm, KC=conv_w.shape[1], HAS_CB=conv_b is not None, PREC=_dot_precision(w_in.dtype), PDL=pdl,
        **_pf_args(prefetch, res_MD, tiles), **tiles, **_pdl_launch(pdl),
    )
    return x, z


@triton.jit
def _linear_residual_kernel(
    x_ptr, w_ptr, res_ptr, part_ptr, cnt_ptr, M, N, s_xm, s_wn, s_wk, s_rm,
    Kd: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (output block, row block, split sp); SPLIT > 1 at one row only."""
    pid_n, pid_m, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc, _ = _row_normed_dot(x_ptr, x_ptr, w_ptr, m, m_ok, n, n_ok, s_xm, s_wn, s_wk, sp * CHUNK,
                             Kd, False, PREC, PDL, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK)
    ptrs = res_ptr + m[:, None] * s_rm + n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    done, total = _split_total(acc, part_ptr, cnt_ptr, pid_n, sp, SPLIT)  # SPLIT > 1: one row, (1, BLOCK_N)
    if done:
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + total, mask=ok)


def linear_residual_(res_MN: Tensor, x_MK: Tensor, w_NK: Tensor) -> Tensor:
    """res += x @ w^T in place (res fp32 (M, N), w an nn.Linear weight (N, K) without bias); returns res."""
    M, Kd = x_MK.shape
    N = w_NK.shape[0]
    tiles, pdl = _tiles(M, "out_proj"), _pdl(res_MN)
    chunk, split = _split(Kd, tiles) if M == 1 else (Kd, 1)
    grid = (triton.cdiv(N, tiles["BLOCK_N"]), triton.cdiv(M, tiles["BLOCK_M"]), split)
    parts = torch.empty(grid[0] * split * tiles["BLOCK_N"] if split > 1 else 0, device=res_MN.device, dtype=torch.float32)
    counters = _counters(res_MN.device, "out_proj", grid[0]) if split > 1 else parts
    _linear_residual_kernel[grid](
        x_MK, w_NK, res_MN, parts, counters, M, N, x_MK.stride(0), *w_NK.stride(), res_MN.stride(0),
        Kd=Kd, PREC=_dot_precision(w_NK.dtype), PDL=pdl, CHUNK=chunk, SPLIT=split,
        **{k: v for k, v in tiles.items() if k != "SPLIT"}, **_pdl_launch(pdl),
    )
    return res_MN


@triton.jit
def _norm_gate_kernel(
    res_ptr, nw_ptr, g_ptr, gb_ptr, h_ptr, logit_ptr, ids_ptr, wt_ptr, NE, eps, s_rm, s_gn, s_gk, s_hm, s_lm,
    Dm: tl.constexpr, HAS_GB: tl.constexpr, ROUTE: tl.constexpr, PDL: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: writes its normed h and its router logits, fp32 products of the rounded h (what
    the module's fp32 gate sees). Two unrolled passes: the sum of squares, then h and the logits.
    ROUTE 1 or 2: also the top-1 expert and its gate weight, sigmoid of its logit (1) or its softmax
    probability over all experts (2)."""
    m = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < NE
    _gdc_wait(PDL)  # everything it reads but the small gate comes from the kernels before it
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, Dm, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        r = tl.load(res_ptr + m * s_rm + kk, mask=kk < Dm, other=0.0)
        ss += r * r
    rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / Dm + eps)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for k0 in tl.static_range(0, Dm, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < Dm
        r = tl.load(res_ptr + m * s_rm + kk, mask=k_ok, other=0.0)
        nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        h = (r * rstd * nw).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + m * s_hm + kk, h, mask=k_ok)
        g = tl.load(g_ptr + e[:, None] * s_gn + kk[None, :] * s_gk, mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32) * h.to(tl.float32)[None, :], 1)
    if HAS_GB:
        acc += tl.load(gb_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    tl.store(logit_ptr + m * s_lm + e, acc, mask=e_ok)
    if ROUTE > 0:
        logits = tl.where(e_ok, acc, float("-inf"))
        best = tl.max(logits, 0)
        if ROUTE == 1:
            weight = tl.sigmoid(best)
        else:
            weight = 1.0 / tl.sum(tl.exp(logits - best), 0)
        tl.store(ids_ptr + m, tl.argmax(logits, 0).to(tl.int64))
        tl.store(wt_ptr + m, weight)


ROUTES = {"sigmoid": 1, "softmax": 2}  # the top-1 gates that norm_gate can apply (Router.eval_gate)


def norm_gate(
    res_MD: Tensor, norm_w: Tensor, eps: float, gate_w: Tensor, gate_b: Tensor | None, top1_gate: str | None = None
) -> tuple[Tensor, ...]:
    """(h (M, D) in norm_w's dtype, logits (M, E) fp32): h = RMSNorm(res), logits = h gate_w^T + gate_b.
    top1_gate "sigmoid" or "softmax" (see ROUTES): also (expert ids (M, 1) int64, gate weights (M, 1) fp32)
    of the top-1 rule with that gate."""
    M, Dm = res_MD.shape
    NE = gate_w.shape[0]
    h = torch.empty(M, Dm, device=res_MD.device, dtype=norm_w.dtype)
    logits = torch.empty(M, NE, device=res_MD.device, dtype=torch.float32)
    route = 0 if top1_gate is None else ROUTES[top1_gate]
    ids = torch.empty(M, 1, device=res_MD.device, dtype=torch.int64) if route else None
    weights = torch.empty(M, 1, device=res_MD.device, dtype=torch.float32) if route else None
    tiles, pdl = _tiles(1, "gate"), _pdl(res_MD)
    _norm_gate_kernel[(M,)](
        res_MD, norm_w, gate_w, gate_b, h, logits, ids, weights, NE, eps,
        res_MD.stride(0), *gate_w.stride(), h.stride(0), logits.stride(0),
        Dm=Dm, HAS_GB=gate_b is not None, ROUTE=route, PDL=pdl, BLOCK_E=triton.next_power_of_2(NE),
        BLOCK_K=tiles["BLOCK_K"], **_launch(tiles, pdl),
    )
    return (h, logits) if not route else (h, logits, ids, weights)


@triton.jit
def _expert_up_kernel(
    h_ptr, ids_ptr, w_ptr, a_ptr, part_ptr, cnt_ptr, F, K, s_hm, s_we, s_wd, s_wf, s_am,
    Dm: tl.constexpr, GEGLU: tl.constexpr, PDL: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (f block, split sp, slot s): inputs sp*CHUNK .. (sp+1)*CHUNK of the gate and up halves."""
    pid_f, sp, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = s // K
    _gdc_wait(PDL)  # which expert's weights to read is the router's result
    ex = tl.load(ids_ptr + s).to(tl.int64)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    acc_g, acc_u = _glu_up_dot(h_ptr + t * s_hm, h_ptr, 1.0, w_ptr + ex * s_we, f, f_ok, F, sp * CHUNK,
                               s_wd, s_wf, Dm, False, CHUNK, BLOCK_K)
    done, total = _split_total(tl.join(acc_g, acc_u), part_ptr, cnt_ptr, s * tl.num_programs(0) + pid_f, sp, SPLIT)
    if done:
        gate, up = tl.split(total)
        tl.store(a_ptr + s * s_am + f, (glu_gate(gate, GEGLU) * up).to(a_ptr.dtype.element_ty), mask=f_ok)


def expert_glu_up(h_TD: Tensor, ids_TK: Tensor, w_in: Tensor, activation: str) -> Tensor:
    """a (T*K, F): glu(h_t @ w_in[e]) for each slot (t, k) of expert e = ids[t, k]; w_in (E, D, 2F), gate half first."""
    T, Dm = h_TD.shape
    K = ids_TK.shape[1]
    F2 = w_in.shape[2]
    a = torch.empty(T * K, F2 // 2, device=h_TD.device, dtype=w_in.dtype)
    tiles, pdl = _tiles(1, "expert_up"), _pdl(h_TD)
    chunk, split = _split(Dm, tiles)
    grid = (triton.cdiv(F2 // 2, tiles["BLOCK_N"]), split, T * K)
    parts = torch.empty(grid[0] * grid[2] * split * 2 * tiles["BLOCK_N"] if split > 1 else 0,
                        device=h_TD.device, dtype=torch.float32)
    counters = _counters(h_TD.device, "expert_up", grid[0] * grid[2]) if split > 1 else parts
    ids = ids_TK.reshape(-1).contiguous()
    _expert_up_kernel[grid](
        h_TD, ids, w_in, a, parts, counters, F2 // 2, K, h_TD.stride(0), *w_in.stride(), a.stride(0),
        Dm=Dm, GEGLU=activation == "geglu", PDL=pdl, BLOCK_F=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"],
        CHUNK=chunk, SPLIT=split, **_launch(tiles, pdl),
    )
    return a


@triton.jit
def _route_up_kernel(
    res_ptr, nw_ptr, g_ptr, gb_ptr, w_ptr, a_ptr, ids_ptr, wt_ptr, part_ptr, cnt_ptr, pf_ptr, pf_lines, NE, F, eps,
    s_gn, s_gk, s_we, s_wd, s_wf, s_pfe,
    Dm: tl.constexpr, HAS_GB: tl.constexpr, ROUTE: tl.constexpr, GEGLU: tl.constexpr, PDL: tl.constexpr,
    PF: tl.constexpr, PF_STEP: tl.constexpr, PF_BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, SPLIT: tl.constexpr,
):
    """One token, a top-1 router: norm_gate and expert_glu_up in one kernel. Every program forms the normed
    row and the router's choice itself (the same code on the same inputs: all programs choose alike), then
    its block of the chosen expert's up projection; program (0, 0) stores the choice for expert_down. PF: each
    program also pulls its share of the chosen expert's down projection (pf_ptr + ex * s_pfe) into L2."""
    pid_f, sp = tl.program_id(0), tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    d = tl.arange(0, BLOCK_D)
    e_ok, d_ok = e < NE, d < Dm
    g = tl.load(g_ptr + e[:, None] * s_gn + d[None, :] * s_gk, mask=e_ok[:, None] & d_ok[None, :], other=0.0)
    nw = tl.load(nw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    _gdc_wait(PDL)
    r = tl.load(res_ptr + d, mask=d_ok, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, 0) / Dm + eps)
    h = (r * rstd * nw).to(nw_ptr.dtype.element_ty).to(tl.float32)  # the rounded h the module's fp32 gate sees
    logits = tl.sum(g.to(tl.float32) * h[None, :], 1)
    if HAS_GB:
        logits += tl.load(gb_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    logits = tl.where(e_ok, logits, float("-inf"))
    best = tl.max(logits, 0)
    ex = tl.argmax(logits, 0).to(tl.int64)
    if ROUTE == 1:
        weight = tl.sigmoid(best)
    else:
        weight = 1.0 / tl.sum(tl.exp(logits - best), 0)
    if (pid_f == 0) & (sp == 0):
        tl.store(ids_ptr, ex)
        tl.store(wt_ptr, weight)
    if PF:
        _prefetch_l2(pf_ptr + ex * s_pfe, pf_lines, PF_STEP, PF_BLOCK)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    acc_g, acc_u = _glu_up_dot(res_ptr, nw_ptr, rstd, w_ptr + ex * s_we, f, f_ok, F, sp * CHUNK,
                               s_wd, s_wf, Dm, True, CHUNK, BLOCK_K)
    done, total = _split_total(tl.join(acc_g, acc_u), part_ptr, cnt_ptr, pid_f, sp, SPLIT)
    if done:
        gate, up = tl.split(total)
        tl.store(a_ptr + f, (glu_gate(gate, GEGLU) * up).to(a_ptr.dtype.element_ty), mask=f_ok)


def route_glu_up(
    res_1D: Tensor, norm_w: Tensor, eps: float, gate_w: Tensor, gate_b: Tensor | None, top1_gate: str,
    w_in: Tensor, activation: str, w_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token (res_1D fp32, (1, D)) through a top-1 router: (a (1, F) in w_in's dtype, expert ids (1, 1)
    int64, gate weights (1, 1) fp32), the same as norm_gate(..., top1_gate) followed by expert_glu_up, in one
    launch (the tiles of expert_up). top1_gate: "sigmoid" or "softmax" (ROUTES). w_out (E, F, D), contiguous:
    the chosen expert's down projection is pulled into L2 for expert_down_residual_."""
    M, Dm = res_1D.shape
    if M != 1 or res_1D.stride(1) != 1:
        raise ValueError(f"route_glu_up takes one contiguous token row, got shape {tuple(res_1D.shape)}")
    F = w_in.shape[2] // 2
    a = torch.empty(1, F, device=res_1D.device, dtype=w_in.dtype)
    ids = torch.empty(1, 1, device=res_1D.device, dtype=torch.int64)
    weights = torch.empty(1, 1, device=res_1D.device, dtype=torch.float32)
    tiles, pdl = _tiles(1, "expert_up"), _pdl(res_1D)
    chunk, split = _split(Dm, tiles)
    grid = (triton.cdiv(F, tiles["BLOCK_N"]), split)
    parts = torch.empty(grid[0] * split * 2 * tiles["BLOCK_N"] if split > 1 else 0,
                        device=res_1D.device, dtype=torch.float32)
    counters = _counters(res_1D.device, "route_up", grid[0]) if split > 1 else parts
    _route_up_kernel[grid](
        res_1D, norm_w, gate_w, gate_b, w_in, a, ids, weights, parts, counters, NE=gate_w.shape[0], F=F, eps=eps,
        s_gn=gate_w.stride(0), s_gk=gate_w.stride(1), s_we=w_in.stride(0), s_wd=w_in.stride(1),
        s_wf=w_in.stride(2), s_pfe=0 if w_out is None else w_out.stride(0),
        **_pf_args(w_out, res_1D, tiles, None if w_out is None else w_out[0].numel()),
        Dm=Dm, HAS_GB=gate_b is not None, ROUTE=ROUTES[top1_gate], GEGLU=activation == "geglu", PDL=pdl,
        BLOCK_E=triton.next_power_of_2(gate_w.shape[0]), BLOCK_D=triton.next_power_of_2(Dm),
        BLOCK_F=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"], CHUNK=chunk, SPLIT=split, **_launch(tiles, pdl),
    )
    return a, ids, weights


@triton.jit
def _expert_down_kernel(
    a_ptr, ids_ptr, g_ptr, w_ptr, res_ptr, part_ptr, cnt_ptr, pf_ptr, pf_lines, Dm, K, s_am, s_we, s_wf, s_wd, s_rm,
    F: tl.constexpr, PDL: tl.constexpr, PF: tl.constexpr, PF_STEP: tl.constexpr, PF_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (output block, split sp, token t): expert features sp*CHUNK .. (sp+1)*CHUNK of t's slots."""
    pid_n, sp, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Dm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PF:  # a later kernel's weights (the next Mamba block's in_proj) into L2, while the expert up finishes
        _prefetch_l2(pf_ptr, pf_lines, PF_STEP, PF_BLOCK)
    _gdc_wait(PDL)  # the experts, their gate weights and the activations all come from the kernels before
    for j in range(K):  # the token's slots in order: the sum is deterministic
        s = t * K + j
        ex = tl.load(ids_ptr + s).to(tl.int64)
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for f0 in tl.static_range(0, CHUNK, BLOCK_F):
            ff = sp * CHUNK + f0 + tl.arange(0, BLOCK_F)
            f_ok = ff < F
            a = tl.load(a_ptr + s * s_am + ff, mask=f_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ex * s_we + ff[:, None] * s_wf + n[None, :] * s_wd,
                        mask=f_ok[:, None] & n_ok[None, :], other=0.0)
            part += tl.sum(w.to(tl.float32) * a[:, None], 0)
        acc += tl.load(g_ptr + s).to(tl.float32) * part
    ptrs = res_ptr + t * s_rm + n
    done, total = _split_total(acc[:, None], part_ptr, cnt_ptr, t * tl.num_programs(0) + pid_n, sp, SPLIT)
    if done:
        tl.store(ptrs, tl.load(ptrs, mask=n_ok, other=0.0) + tl.reshape(total, [BLOCK_N]), mask=n_ok)


def expert_down_residual_(
    res_TD: Tensor, a_SF: Tensor, ids_TK: Tensor, weights_TK: Tensor, w_out: Tensor, prefetch: Tensor | None = None
) -> Tensor:
    """res_t += sum_k weights[t, k] * a_{tk} @ w_out[ids[t, k]] in place (fp32); w_out (E, F, D). Returns res.
    prefetch: a contiguous weight of a later kernel to pull into L2 (see the module docstring)."""
    T, K = ids_TK.shape
    F, Dm = w_out.shape[1:]
    tiles, pdl = _tiles(1, "expert_down"), _pdl(res_TD)
    chunk, split = _split(F, tiles)
    grid = (triton.cdiv(Dm, tiles["BLOCK_N"]), split, T)
    parts = torch.empty(grid[0] * T * split * tiles["BLOCK_N"] if split > 1 else 0,
                        device=res_TD.device, dtype=torch.float32)
    counters = _counters(res_TD.device, "expert_down", grid[0] * T) if split > 1 else parts
    _expert_down_kernel[grid](
        a_SF, ids_TK.reshape(-1).contiguous(), weights_TK.float().reshape(-1).contiguous(), w_out, res_TD,
        parts, counters, Dm=Dm, K=K, s_am=a_SF.stride(0), s_we=w_out.stride(0), s_wf=w_out.stride(1),
        s_wd=w_out.stride(2), s_rm=res_TD.stride(0), F=F, PDL=pdl, **_pf_args(prefetch, res_TD, tiles),
        BLOCK_N=tiles["BLOCK_N"], BLOCK_F=tiles["BLOCK_K"], CHUNK=chunk, SPLIT=split, **_launch(tiles, pdl),
    )
    return res_TD


@triton.jit
def _gated_glu_kernel(
    up_ptr, ids_ptr, wt_ptr, a_ptr, F, K, s_ue, s_ut, s_uf,
    NE: tl.constexpr, GEGLU: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f, te = tl.program_id(0), tl.program_id(1)
    t, e = te // NE, te % NE
    scale = 0.0  # the token's gate weight for expert e: 0 unless one of its slots chose it
    for j in range(K):
        s = t * K + j
        scale += tl.where(tl.load(ids_ptr + s) == e, tl.load(wt_ptr + s), 0.0)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    row = up_ptr + e.to(tl.int64) * s_ue + t.to(tl.int64) * s_ut
    g = tl.load(row + f * s_uf, mask=f_ok, other=0.0).to(tl.float32)
    u = tl.load(row + (F + f) * s_uf, mask=f_ok, other=0.0).to(tl.float32)
    a = glu_gate(g, GEGLU) * u * scale
    tl.store(a_ptr + te.to(tl.int64) * F + f, a.to(a_ptr.dtype.element_ty), mask=f_ok)


def gated_glu(up_ETH: Tensor, ids_TK: Tensor, weights_TK: Tensor, activation: str) -> Tensor:
    """a (T, E*F) in up's dtype: a[t, e*F + f] = g_te * glu(up[e, t])_f, with g_te the gate weight of the
    token's slot that chose expert e (0 if none did). up_ETH (E, T, 2F): every expert's input projection of
    every token, gate half first. One pass for the GLU, the gate scaling and the (T, E, F) layout that the
    down projection over all experts' features reads (blocks.moe_decode, from one slot per expert)."""
    E, T, F2 = up_ETH.shape
    F, K = F2 // 2, ids_TK.shape[1]
    a = torch.empty(T, E * F, device=up_ETH.device, dtype=up_ETH.dtype)
    block_f = 16 if interpreting() else 1024
    _gated_glu_kernel[(triton.cdiv(F, block_f), T * E)](
        up_ETH, ids_TK.reshape(-1).contiguous(), weights_TK.float().reshape(-1).contiguous(), a, F, K,
        *up_ETH.stride(), NE=E, GEGLU=activation == "geglu", BLOCK_F=block_f,
        **({} if interpreting() else {"num_warps": 4}),
    )
    return a


@triton.jit
def _x_proj_split_k_kernel(
    x_ptr, w_ptr, part_ptr, NX, s_xm, s_wn, s_wk, s_ps, s_pm,
    Kd: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, sl, m = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < NX
    w = _load_w(w_ptr, n, n_ok, sl * BLOCK_K, s_wn, s_wk, Kd, BLOCK_K)  # all of the program's weights
    _gdc_wait(PDL)
    kk = sl * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + m * s_xm + kk, mask=kk < Kd, other=0.0).to(tl.float32)
    part = tl.sum(w.to(tl.float32) * x[None, :], 1)
    tl.store(part_ptr + sl * s_ps + m * s_pm + n, part, mask=n_ok)


def x_proj_split_k(x_ME: Tensor, w_x: Tensor) -> Tensor:
    """parts (S, M, NX) fp32 with sum_s parts[s] = x @ w_x^T: slice s holds the products over inputs
    s*BLOCK_K .. (s+1)*BLOCK_K. A projection to a hundred outputs from thousands of inputs has too few output
    blocks to keep the GPU's loads in flight; slicing the inputs gives it S times as many programs, and the
    kernel that reads the result (dt_proj_ssm_step) sums the S slices, in a fixed order."""
    M, Kd = x_ME.shape
    NX = w_x.shape[0]
    tiles, pdl = _tiles(1, "x_proj"), _pdl(x_ME)
    S = triton.cdiv(Kd, tiles["BLOCK_K"])
    parts = torch.empty(S, M, NX, device=x_ME.device, dtype=torch.float32)
    _x_proj_split_k_kernel[(triton.cdiv(NX, tiles["BLOCK_N"]), S, M)](
        x_ME, w_x, parts, NX, x_ME.stride(0), *w_x.stride(), parts.stride(0), parts.stride(1),
        Kd=Kd, PDL=pdl, BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"], **_launch(tiles, pdl),
    )
    return parts


@triton.jit
def _dt_proj_ssm_step_kernel(
    part_ptr, wdt_ptr, bias_ptr, A_ptr, D_ptr, state_ptr, x_ptr, z_ptr, y_ptr, S, DIM,
    s_ps, s_pm, s_wd, s_wr, s_Ad, s_An, s_hb, s_hd, s_hn, s_xm, s_zm, s_ym,
    R: tl.constexpr, N: tl.constexpr, SP: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, PDL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r, n, sl = tl.arange(0, RP), tl.arange(0, NP), tl.arange(0, SP)
    d_ok, r_ok, n_ok, s_ok = d < DIM, r < R, n < N, sl < S
    dn_ok = d_ok[:, None] & n_ok[None, :]
    # the parameters first: no kernel of the step writes them
    w_dt = tl.load(wdt_ptr + d[:, None] * s_wd + r[None, :] * s_wr, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
    A = -tl.exp(tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=dn_ok, other=0.0).to(tl.float32))
    _gdc_wait(PDL)
    # x_proj's output (dt_low, B, C) as the sum of its slices
    rows = part_ptr + sl[:, None] * s_ps + b * s_pm
    dt_low = tl.sum(tl.load(rows + r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0), 0)
    Bv = tl.sum(tl.load(rows + R + n[None, :], mask=s_ok[:, None] & n_ok[None, :], other=0.0), 0)
    Cv = tl.sum(tl.load(rows + R + N + n[None, :], mask=s_ok[:, None] & n_ok[None, :], other=0.0), 0)
    dt = tl.sum(w_dt.to(tl.float32) * dt_low[None, :], 1)  # dt_proj for this program's channels
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus
    x = tl.load(x_ptr + b * s_xm + d, mask=d_ok, other=0.0).to(tl.float32)
    h_ptrs = state_ptr + b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn
    h = tl.exp(dt[:, None] * A) * tl.load(h_ptrs, mask=dn_ok, other=0.0) + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h, mask=dn_ok)
    y = tl.sum(h * Cv[None, :], 1)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zm + d, mask=d_ok, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * s_ym + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


def dt_proj_ssm_step(
    parts: Tensor, dt_w: Tensor, dt_bias: Tensor | None, A_log: Tensor, D: Tensor | None,
    state: Tensor, x: Tensor, z: Tensor | None,
) -> Tensor:
    """y (M, E) in x's dtype, the state (M, E, N) fp32 advanced in place: with (dt_low, B, C) = sum_s parts[s]
    (x_proj_split_k's slices; R + 2N columns), dt = softplus(dt_low @ dt_w^T + dt_bias) and A = -exp(A_log),
    the update of blocks.kernels.ssm_step (h <- exp(dt A) h + dt x B, y = (C . h + D x) * silu(z))."""
    if state.dtype != torch.float32:
        raise ValueError(f"the SSM state must be fp32, got {state.dtype}")
    S, M, _ = parts.shape
    DIM, R = dt_w.shape
    N = state.shape[2]
    y = torch.empty_like(x)
    tiles, pdl = _tiles(1, "ssm"), _pdl(x)
    block_d = 4 if interpreting() else tiles["BLOCK_N"]
    _dt_proj_ssm_step_kernel[(triton.cdiv(DIM, block_d), M)](
        parts, dt_w, dt_bias, A_log, D, state, x, z, y, S, DIM,
        parts.stride(0), parts.stride(1), *dt_w.stride(), *A_log.stride(), *state.stride(),
        x.stride(0), 0 if z is None else z.stride(0), y.stride(0),
        R=R, N=N, SP=triton.next_power_of_2(S), RP=triton.next_power_of_2(R), NP=triton.next_power_of_2(N),
        HAS_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None, PDL=pdl, BLOCK_D=block_d,
        **_launch(tiles, pdl),
    )
    return y


# ---- PyTorch twins: the same math with torch ops, what the kernels are tested against ----

gated_glu_ref = gated_glu_torch  # the dense decoding path's own torch function (blocks.moe_decode)

def rms_norm_ref(res_MD: Tensor, norm_w: Tensor, eps: float) -> Tensor:
    """RMSNorm of the fp32 residual, rounded to the weights' dtype."""
    return (res_MD * torch.rsqrt(res_MD.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()).to(norm_w.dtype)


def norm_in_proj_conv_ref(res_MD, norm_w, eps, w_in, conv_state, conv_w, conv_b):
    xz = F.linear(rms_norm_ref(res_MD, norm_w, eps), w_in).float()
    E = w_in.shape[0] // 2
    conv_state.copy_(torch.cat([conv_state[..., 1:], xz[:, :E, None].to(conv_state.dtype)], dim=-1))
    y = (conv_state.float() * conv_w.float()).sum(-1)
    if conv_b is not None:
        y = y + conv_b.float()
    return F.silu(y).to(w_in.dtype), xz[:, E:].to(w_in.dtype)


def norm_gate_ref(res_MD, norm_w, eps, gate_w, gate_b, top1_gate=None):
    h = rms_norm_ref(res_MD, norm_w, eps)
    logits = F.linear(h.float(), gate_w.float(), None if gate_b is None else gate_b.float())
    if top1_gate is None:
        return h, logits
    scores = torch.sigmoid(logits) if top1_gate == "sigmoid" else torch.softmax(logits, dim=-1)
    weights, ids = scores.max(dim=-1, keepdim=True)
    return h, logits, ids, weights


def expert_glu_up_ref(h_TD, ids_TK, w_in, activation):
    K = ids_TK.shape[1]
    x_S1D = h_TD.float().repeat_interleave(K, dim=0)[:, None]
    return glu_activation(activation)(torch.bmm(x_S1D, w_in[ids_TK.reshape(-1)].float())[:, 0]).to(w_in.dtype)


def expert_down_residual_ref_(res_TD, a_SF, ids_TK, weights_TK, w_out):
    T, K = ids_TK.shape
    y_SD = torch.bmm(a_SF.float()[:, None], w_out[ids_TK.reshape(-1)].float())[:, 0]
    return res_TD.add_((y_SD.view(T, K, -1) * weights_TK.float()[..., None]).sum(1))


def dt_proj_ssm_step_ref(parts, dt_w, dt_bias, A_log, D, state, x, z):
    from blocks.scan import selective_state_step

    dbc = parts.sum(0)
    R, N = dt_w.shape[1], state.shape[2]
    dt = dbc[:, :R] @ dt_w.float().T
    return selective_state_step(state, x, dt, -torch.exp(A_log.float()), dbc[:, R:R + N], dbc[:, R + N:],
                                D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def route_glu_up_ref(res_1D, norm_w, eps, gate_w, gate_b, top1_gate, w_in, activation):
    h, _, ids, weights = norm_gate_ref(res_1D, norm_w, eps, gate_w, gate_b, top1_gate)
    return expert_glu_up_ref(h, ids, w_in, activation), ids, weights
