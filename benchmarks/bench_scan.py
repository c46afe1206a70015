"""Mamba-1 on the GPU: our Triton selective scan, conv and mixer side by side with the PyTorch reference
and mamba-ssm's CUDA kernels (when installed), one process, one GPU, bf16.

    python3 benchmarks/bench_scan.py            # about 3 minutes on an H200; OUT=dir also writes bench_scan.json
    python3 benchmarks/bench_scan.py --smoke    # every section on tiny CPU shapes under Triton's interpreter
    python3 benchmarks/bench_scan.py --only=correctness_conv_and_mixer,mixer_timings   # some sections only

Order: correctness first (bf16 and fp32 kernels against an fp64 reference on the same inputs, relative
errors of every output and gradient), then medians of triton.testing.do_bench: scan forward and fwd+bwd at
BlackMamba shapes, a small sweep of tile sizes, the causal conv, and the whole mixer against
mamba_ssm.modules.mamba_simple.Mamba. Each section runs on its own, so one failure does not lose the rest.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench as _do_bench  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blocks.conv import causal_conv1d  # noqa: E402
from blocks.kernels.causal_conv1d import causal_conv1d_triton  # noqa: E402
from blocks.kernels import selective_scan as selective_scan_module  # noqa: E402
from blocks.kernels.selective_scan import LAUNCHED, ScanTiles, default_tiles, selective_scan_triton  # noqa: E402
from blocks import mamba as mamba_module  # noqa: E402
from blocks.mamba import Mamba, MambaConfig  # noqa: E402
from blocks.scan import selective_scan_chunked  # noqa: E402

dev, bf16 = ("cpu", torch.float16) if SMOKE else ("cuda", torch.bfloat16)  # the interpreter has no bf16
results: dict = {"env": {}, "correctness": {}, "timings": [], "sweep": [], "errors": []}
t_start = time.time()

import_errors = {}
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError as e:
    selective_scan_fn, import_errors["mamba_ssm"] = None, str(e)[:300]
try:
    from causal_conv1d import causal_conv1d_fn
except ImportError as e:
    causal_conv1d_fn, import_errors["causal_conv1d"] = None, str(e)[:300]


def do_bench(fn, warmup=25, rep=100, return_mode="median"):
    if not SMOKE:
        return _do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def log(msg: str) -> None:
    print(msg, flush=True)


def section(fn):
    """Run one part of the benchmark; report and keep going on failure."""
    if ONLY is not None and fn.__name__ not in (*ONLY, "env", "summary"):
        return fn
    log(f"\n== {fn.__name__} ({time.time() - t_start:.0f} s)")
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a benchmark must survive any one failure
        traceback.print_exc()
        results["errors"].append(f"{fn.__name__}: {type(e).__name__}: {str(e)[:500]}")
    if not SMOKE:
        torch.cuda.empty_cache()
    return fn


def scan_inputs(Bsz, L, D, N, dtype=bf16, bias=False, seed=0):
    """The off-the-shelf anchor's inputs (shared/bench/offtheshelf_kernels.py): u, z, B, C ~ N(0, 1),
    raw delta ~ U(0, 1) before softplus, A = -U(0, 1), D ~ N(0, 1); plus a delta bias if asked."""
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    ins = dict(
        u=r(Bsz, D, L), delta=torch.rand(Bsz, D, L, device=dev, generator=g).to(dtype),
        A=-torch.rand(D, N, device=dev, generator=g), B=r(Bsz, N, L), C=r(Bsz, N, L),
        D=r(D, dt=torch.float32), z=r(Bsz, D, L),
    )
    if bias:
        ins["delta_bias"] = torch.rand(D, device=dev, generator=g) - 4.0  # softplus(bias) ~ 0.02-0.05: long memory
    return ins


def mixer_layout(ins: dict, R: int = 72) -> dict:
    """The same values laid out as the mixer hands them to the scan: u, delta, z as (B, D, L) views of
    (B, L, D) tensors (z a slice of in_proj's output), B and C as slices of x_proj's (B, L, R + 2N) output."""
    Bsz, D, L = ins["u"].shape
    N = ins["A"].shape[1]
    out = dict(ins)
    for k in ("u", "delta"):
        out[k] = ins[k].transpose(1, 2).contiguous().transpose(1, 2)
    xz = torch.empty(Bsz, L, 2 * D, device=dev, dtype=ins["z"].dtype)
    xz[..., D:] = ins["z"].transpose(1, 2)
    out["z"] = xz[..., D:].transpose(1, 2)
    dbc = torch.zeros(Bsz, L, R + 2 * N, device=dev, dtype=ins["B"].dtype)
    dbc[..., R:R + N], dbc[..., R + N:] = ins["B"].transpose(1, 2), ins["C"].transpose(1, 2)
    out["B"], out["C"] = dbc[..., R:R + N].transpose(1, 2), dbc[..., R + N:].transpose(1, 2)
    return out


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fwd_bwd(fn, ins, names, with_last=False):
    """A closure running fn's forward and backward w.r.t. `names`, for timing."""
    # strided views stay views (a clone would make them dense), so the kernels see the layout asked for
    leaves = {k: (v.detach().clone() if v.is_contiguous() else v.detach()).requires_grad_(k in names) for k, v in ins.items()}
    out = fn(**leaves)
    g = torch.randn_like(out[0] if isinstance(out, tuple) else out)

    def run():
        y = fn(**leaves)
        torch.autograd.grad(y[0] if isinstance(y, tuple) else y, [leaves[k] for k in names], g)

    return run


def timeit(label, fn, rep=100, **meta) -> float:
    ms = do_bench(fn, warmup=10, rep=rep, return_mode="median")
    results["timings"].append(dict(label=label, ms=ms, **meta))
    log(f"  {label:<58s} {ms:9.3f} ms")
    return ms


@section
def env():
    p = torch.cuda.get_device_properties(0) if not SMOKE else None
    e = dict(gpu=p.name if p else "cpu (smoke)", sms=p.multi_processor_count if p else 0, torch=torch.__version__,
             triton=triton.__version__, cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d %H:%M:%S"),
             mamba_ssm=selective_scan_fn is not None, causal_conv1d=causal_conv1d_fn is not None,
             import_errors=import_errors, tiles_B8_D2304=list(default_tiles(16, 8 * 2304)),
             tiles_B1_D2304=list(default_tiles(16, 2304)))
    results["env"] = e
    log(json.dumps(e))


@section
def correctness_scan():
    """bf16 and fp32 kernels vs an fp64 reference on the same (rounded) inputs, every output and gradient."""
    Bsz, L, D, N = (2, 1000, 384, 16) if not SMOKE else (2, 37, 12, 4)  # L not a multiple of any chunk
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    for dtype in (torch.float32, bf16):
        ins = scan_inputs(Bsz, L, D, N, dtype=dtype, bias=True, seed=1)
        ins["initial_state"] = torch.randn(Bsz, D, N, device=dev)
        outs = {}
        for impl, fn in (("ref_fp64", selective_scan_chunked), ("triton", selective_scan_triton)):
            cast = (lambda t: t.double()) if impl == "ref_fp64" else (lambda t: t)
            leaves = {k: cast(v).detach().requires_grad_() for k, v in ins.items()}
            y, last = fn(**leaves, delta_softplus=True, return_last_state=True)
            gen = torch.Generator(device=dev).manual_seed(2)
            gy = torch.randn(y.shape, device=dev, generator=gen, dtype=torch.float64)
            gl = torch.randn(last.shape, device=dev, generator=gen, dtype=torch.float64)
            loss = (y.double() * gy).sum() + (last.double() * gl).sum()
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
            outs[impl] = dict(y=y, last=last, **{f"d{k}": g for k, g in zip(names, grads)})
        errs = {k: rel(outs["triton"][k], outs["ref_fp64"][k]) for k in outs["ref_fp64"]}
        if dtype == bf16 and selective_scan_fn is not None:  # mamba-ssm on the same inputs, for scale
            leaves = {k: v.detach().requires_grad_() for k, v in ins.items() if k != "initial_state"}
            y = selective_scan_fn(**leaves, delta_softplus=True)
            gy = torch.randn(y.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(2), dtype=torch.float64)
            # reference without initial state, for mamba-ssm's comparison
            ref_leaves = {k: v.double().detach().requires_grad_() for k, v in leaves.items()}
            y_ref = selective_scan_chunked(**ref_leaves, delta_softplus=True)
            g_ms = torch.autograd.grad((y.double() * gy).sum(), list(leaves.values()))
            g_ref = torch.autograd.grad((y_ref * gy).sum(), list(ref_leaves.values()))
            errs["mamba_ssm_y"] = rel(y, y_ref)
            errs.update({f"mamba_ssm_d{k}": rel(a, b) for k, a, b in zip(leaves, g_ms, g_ref)})
        results["correctness"][f"scan_{str(dtype)[6:]}"] = errs
        log(f"  scan {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


@section
def correctness_conv_and_mixer():
    torch.manual_seed(3)
    E, L, d_model = (256, 1000, 256) if not SMOKE else (8, 37, 8)
    x = torch.randn(2, L, 2 * E, device=dev)[..., :E].transpose(1, 2)  # a view, like the mixer's
    conv = torch.nn.Conv1d(E, E, 4, groups=E, padding=3).to(dev)
    for dtype in (torch.float32, bf16):
        xd, w, b = x.to(dtype).detach().requires_grad_(), conv.weight.to(dtype), conv.bias.to(dtype)
        gy = torch.randn(2, E, L, device=dev, dtype=dtype)
        y = causal_conv1d_triton(xd, w[:, 0], b, silu=True)
        g = torch.autograd.grad(y, [xd, w, b], gy)
        conv64 = torch.nn.Conv1d(E, E, 4, groups=E, padding=3).to(dev, torch.float64)
        conv64.load_state_dict({"weight": w.double(), "bias": b.double()})
        x64 = xd.detach().double().requires_grad_()
        y_ref = torch.nn.functional.silu(causal_conv1d(x64, conv64))
        g_ref = torch.autograd.grad(y_ref, [x64, conv64.weight, conv64.bias], gy.double())
        errs = dict(y=rel(y, y_ref), dx=rel(g[0], g_ref[0]), dw=rel(g[1], g_ref[1]), db=rel(g[2], g_ref[2]))
        results["correctness"][f"conv_{str(dtype)[6:]}"] = errs
        log(f"  conv {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    # the whole mixer: Triton backend vs the PyTorch backend in fp64, and vs mamba-ssm's module with our weights
    torch.manual_seed(4)
    ours = Mamba(d_model, MambaConfig(backend="triton")).to(dev)
    x = torch.randn(2, L, d_model, device=dev)
    errs = {}
    for dtype in (torch.float32, bf16):
        m = ours.to(dtype)
        xd = x.to(dtype).requires_grad_()
        y = m(xd)  # training: through the one autograd function (blocks/kernels/mamba_inner.py)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xd, *m.parameters()], gy)
        ref = Mamba(d_model, MambaConfig(backend="torch")).to(dev, torch.float64)
        ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        x64 = x.double().requires_grad_()
        y64 = ref(x64)
        grads64 = torch.autograd.grad(y64, [x64, *ref.parameters()], gy.double())
        errs[f"mixer_{str(dtype)[6:]}_vs_fp64"] = rel(y, y64)
        names = ["x"] + [n for n, _ in m.named_parameters()]
        worst = max(zip((rel(g, g64) for g, g64 in zip(grads, grads64)), names))
        errs[f"mixer_{str(dtype)[6:]}_grads_vs_fp64_max"] = worst[0]
        log(f"  mixer {dtype}: worst gradient {worst[1]} rel {worst[0]:.1e}")
        if selective_scan_fn is not None:
            from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

            theirs = MambaSSM(d_model=d_model, d_state=16, d_conv=4, expand=2).to(dev, dtype)
            theirs.load_state_dict(m.state_dict())
            errs[f"mamba_ssm_module_{str(dtype)[6:]}_vs_fp64"] = rel(theirs(x.to(dtype)), ref(x.double()))
    results["correctness"]["mixer"] = errs
    log("  " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


SHAPES = [  # (name, B, L, D, N, time the torch reference too)
    ("1.5B: B8 L2048 D2304", 8, 2048, 2304, 16, True),
    ("2.8B: B8 L2048 D2944", 8, 2048, 2944, 16, False),
    ("long: B8 L16384 D2304", 8, 16384, 2304, 16, False),
    ("long, batch 1: B1 L16384 D2304", 1, 16384, 2304, 16, False),
]
if SMOKE:
    SHAPES = [("smoke: B2 L37 D12 N4", 2, 37, 12, 4, True)]
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z"]


@section
def scan_timings():
    for name, Bsz, L, D, N, with_ref in SHAPES:
        ins = scan_inputs(Bsz, L, D, N)
        impls = [("triton", lambda **k: selective_scan_triton(**k, delta_softplus=True))]
        if selective_scan_fn is not None:
            impls.append(("mamba_ssm", lambda **k: selective_scan_fn(**k, delta_softplus=True)))
        if with_ref:
            impls.append(("torch chunked", lambda **k: selective_scan_chunked(**k, delta_softplus=True)))
        log(f" {name}")
        for impl, fn in impls:
            rep = 20 if impl == "torch chunked" else 100
            try:
                with torch.no_grad():
                    timeit(f"{impl} fwd", lambda: fn(**ins), rep=rep, shape=name, impl=impl, pass_="fwd")
                timeit(f"{impl} fwd+bwd", fwd_bwd(fn, ins, GRAD_NAMES), rep=rep, shape=name, impl=impl, pass_="fwd+bwd")
            except Exception as e:  # noqa: BLE001
                results["errors"].append(f"scan {impl} {name}: {type(e).__name__}: {str(e)[:300]}")
                log(f"  {impl} failed: {type(e).__name__}: {str(e)[:300]}")
        del ins
        if not SMOKE:
            torch.cuda.empty_cache()


def registers(pass_: str) -> tuple:
    """(registers per thread, spills) of the last compiled scan kernel of that pass (None under the interpreter)."""
    h = LAUNCHED.get(pass_)
    return getattr(h, "n_regs", None), getattr(h, "n_spills", None)


@section
def tile_sweep():
    """A few tile choices at the 1.5B shape, to pick the defaults from measurements."""
    ins = scan_inputs(8, 2048, 2304, 16) if not SMOKE else scan_inputs(1, 20, 8, 4)
    fwd_tiles = [(8, 16, 1), (8, 8, 1), (4, 16, 1), (16, 8, 1), (8, 32, 2), (16, 16, 2)]  # (chunk, block_d, warps)
    layouts = {"contiguous": ins, "mixer views": mixer_layout(ins)}
    for fc, fb, fw in fwd_tiles:
        tiles = ScanTiles(fc, fb, fw, fc, 16, 4)  # only the forward runs
        for name, x in layouts.items():  # inside the mixer the forward reads (B, L, D) views
            try:
                with torch.no_grad():
                    ms = do_bench(lambda: selective_scan_triton(**x, delta_softplus=True, tiles=tiles), return_mode="median")
                regs, spills = registers("fwd")
                results["sweep"].append(dict(pass_="fwd", tiles=list(tiles), layout=name, ms=ms, regs=regs, spills=spills))
                log(f"  fwd chunk {fc:3d} block_d {fb:3d} warps {fw}, {name:11s}: {ms:.3f} ms  ({regs} registers, {spills} spills)")
            except Exception as e:  # noqa: BLE001
                log(f"  fwd {tiles} {name} failed: {type(e).__name__}: {str(e)[:200]}")
    # the backward's variants: (chunk, block_d, warps, prefetch the next chunk, fp32 copies of B and C, dB and
    # dC by atomic adds), each timed on contiguous inputs and on the mixer's strided views, with the compiled
    # kernel's registers
    bwd_variants = [(8, 8, 1, True, False, False), (8, 8, 1, True, False, True), (8, 16, 1, True, False, True),
                    (8, 4, 1, True, False, True), (8, 8, 1, False, False, True), (8, 8, 1, True, True, False),
                    (16, 8, 1, True, False, True)]
    if SMOKE:
        bwd_variants = bwd_variants[:2]
    for bc, bb, bw, pf, b32, atomic in bwd_variants:
        tiles = ScanTiles(min(bc, 8), 16, 1, bc, bb, bw, pf, b32, atomic)
        for name, x in layouts.items():
            try:
                run = fwd_bwd(lambda **k: selective_scan_triton(**k, delta_softplus=True, tiles=tiles), x, GRAD_NAMES)
                ms = do_bench(run, return_mode="median")
                regs, spills = registers("bwd")
                results["sweep"].append(dict(pass_="fwd+bwd", tiles=list(tiles), layout=name, ms=ms, regs=regs, spills=spills))
                log(f"  fwd+bwd, bwd chunk {bc} block_d {bb:2d} warps {bw} prefetch {pf:d} fp32 B,C {b32:d} "
                    f"atomic dB,dC {atomic:d}, {name:11s}: "
                    f"{ms:.3f} ms  (bwd kernel {regs} registers, {spills} spills)")
            except Exception as e:  # noqa: BLE001
                log(f"  bwd {tiles} {name} failed: {type(e).__name__}: {str(e)[:200]}")


@section
def conv_timings():
    Bsz, L, E = (8, 2048, 2304) if not SMOKE else (2, 37, 8)
    xz = torch.randn(Bsz, L, 2 * E, device=dev, dtype=bf16)
    x = xz[..., :E].transpose(1, 2)  # the mixer's layout: a (B, E, L) view of in_proj's output
    w = torch.randn(E, 4, device=dev, dtype=bf16)
    b = torch.randn(E, device=dev, dtype=bf16)
    impls = [("triton", lambda x, w, b: causal_conv1d_triton(x, w, b, silu=True)),
             ("torch F.conv1d", lambda x, w, b: torch.nn.functional.silu(
                 torch.nn.functional.conv1d(x, w[:, None], b, padding=3, groups=E)[..., :L]))]
    if causal_conv1d_fn is not None:
        impls.append(("causal_conv1d", lambda x, w, b: causal_conv1d_fn(x, w, b, activation="silu")))
    log(f" conv B{Bsz} L{L} E{E} K4, SiLU")
    for impl, fn in impls:
        try:
            with torch.no_grad():
                timeit(f"{impl} fwd", lambda: fn(x, w, b), impl=impl, shape="conv", pass_="fwd")
            timeit(f"{impl} fwd+bwd", fwd_bwd(fn, dict(x=x, w=w, b=b), ["x", "w", "b"]),
                   impl=impl, shape="conv", pass_="fwd+bwd")
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"conv {impl}: {type(e).__name__}: {str(e)[:300]}")
            log(f"  {impl} failed: {type(e).__name__}: {str(e)[:300]}")


@contextlib.contextmanager
def default_tiles_with(**changes):
    """The scan's default tiles with some fields changed, for a module that takes the defaults."""
    original = selective_scan_module.default_tiles
    selective_scan_module.default_tiles = lambda *a: original(*a)._replace(**changes)
    try:
        yield
    finally:
        selective_scan_module.default_tiles = original


@contextlib.contextmanager
def inner_fused(on: bool):
    """blocks.mamba.FUSED_INNER set for the duration (training through one autograd function, or composed)."""
    previous, mamba_module.FUSED_INNER = mamba_module.FUSED_INNER, on
    try:
        yield
    finally:
        mamba_module.FUSED_INNER = previous


@section
def mixer_timings():
    """The whole mixer (in_proj, conv, x_proj, dt_proj, scan, out_proj), fwd+bwd, bf16, B 8 x L 2048: ours
    (training through one autograd function), ours with dB and dC as partials (not atomic adds), ours composed
    by autograd (blocks.mamba.FUSED_INNER off), the reference, and where installed mamba-ssm's."""
    for d_model in (1152, 1472) if not SMOKE else (8,):
        x = torch.randn(*((8, 2048) if not SMOKE else (2, 37)), d_model, device=dev, dtype=bf16, requires_grad=True)
        g = torch.randn_like(x)
        mixers = [(f"ours backend={b}", Mamba(d_model, MambaConfig(backend=b))) for b in ("triton", "torch")]
        mixers.insert(1, ("ours backend=triton, dB,dC partials", Mamba(d_model, MambaConfig(backend="triton"))))
        mixers.insert(2, ("ours backend=triton, composed by autograd", Mamba(d_model, MambaConfig(backend="triton"))))
        if selective_scan_fn is not None:
            from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

            mixers.append(("ours backend=mamba_ssm", Mamba(d_model, MambaConfig(backend="mamba_ssm"))))
            mixers.append(("ours backend=auto", Mamba(d_model, MambaConfig(backend="auto"))))  # the measured pick
            conv = "with causal-conv1d" if causal_conv1d_fn is not None else "without causal-conv1d"
            mixers.append((f"mamba_ssm Mamba module ({conv})", MambaSSM(d_model=d_model, d_state=16, d_conv=4, expand=2)))
        log(f" mixer d_model {d_model}")
        for label, m in mixers:
            m = m.to(dev, bf16)
            rep = 20 if "torch" in label else 100
            try:
                with default_tiles_with(bc_atomic=False) if "partials" in label else contextlib.nullcontext(), \
                        inner_fused("composed" not in label):
                    with torch.no_grad():
                        timeit(f"{label} fwd", lambda: m(x), rep=rep, shape=f"mixer d{d_model}", impl=label, pass_="fwd")
                    timeit(f"{label} fwd+bwd", lambda: torch.autograd.grad(m(x), [x, *m.parameters()], g), rep=rep,
                           shape=f"mixer d{d_model}", impl=label, pass_="fwd+bwd")
            except Exception as e:  # noqa: BLE001
                results["errors"].append(f"mixer {label}: {type(e).__name__}: {str(e)[:300]}")
                log(f"  {label} failed: {type(e).__name__}: {str(e)[:300]}")
            del m
            if not SMOKE:
                torch.cuda.empty_cache()


@section
def step_timings():
    """One decoding step of the mixer (conv state shift, conv, SiLU, projections, SSM update, gating)."""
    d_model = 1152 if not SMOKE else 8
    for Bsz in (1, 64) if not SMOKE else (2,):
        x = torch.randn(Bsz, d_model, device=dev, dtype=bf16)
        log(f" step d_model {d_model} batch {Bsz}")
        for backend in ("triton", "torch"):
            m = Mamba(d_model, MambaConfig(backend=backend)).to(dev, bf16).eval()
            cache = m.allocate_cache(Bsz, 1)
            with torch.no_grad():
                timeit(f"ours backend={backend} step", lambda: m.step(x, cache), shape=f"step B{Bsz}",
                       impl=f"ours backend={backend}", pass_="step")
        if selective_scan_fn is not None:
            from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

            theirs = MambaSSM(d_model=d_model, d_state=16, d_conv=4, expand=2).to(dev, bf16).eval()
            conv_state, ssm_state = theirs.allocate_inference_cache(Bsz, 1, dtype=bf16)
            with torch.no_grad():
                timeit("mamba_ssm Mamba.step", lambda: theirs.step(x[:, None], conv_state, ssm_state),
                       shape=f"step B{Bsz}", impl="mamba_ssm Mamba.step", pass_="step")


@section
def summary():
    log("\n== summary: median ms (ratio = mamba_ssm / ours: above 1 means ours is faster)")
    rows: dict = {}
    for r in results["timings"]:
        rows.setdefault((r["shape"], r["pass_"]), {})[r["impl"]] = r["ms"]
    for (shape, pass_), by in rows.items():
        ours = by.get("triton") or by.get("ours backend=triton")
        theirs = next((v for k, v in by.items() if k.startswith("mamba_ssm")), None)
        ratio = f"{theirs / ours:5.2f}x" if ours and theirs else "  -  "
        cells = ", ".join(f"{k} {v:.3f}" for k, v in by.items())
        log(f"  {shape:<32s} {pass_:<8s} {ratio}  {cells}")
    if results["errors"]:
        log("errors:\n  " + "\n  ".join(results["errors"]))
    log(f"total {time.time() - t_start:.0f} s")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_scan.json"), "w") as f:
            json.dump(results, f, indent=1)
