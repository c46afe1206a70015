"""The decoding kernels of blocks/kernels/decode.py one by one, over their tile settings, at the 1.5B preset's shapes.

    python benchmarks/bench_decode.py [--batches 1,64] [--only in_proj,expert_up]
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py --smoke   # the same checks on the CPU, tiny shapes

For every kernel and setting (blocks.kernels.decode.TILES): the result against the PyTorch twin on fresh
random bf16 inputs (relative max error, must be below 2e-2), then the time of one launch inside a CUDA graph
(triton.testing.do_bench_cudagraph: what a captured decoding step pays, launch gaps included), next to the
time its weight bytes take at the H200's 4.8 TB/s. The graph runs the kernel on --copies sets of weights in
turn (24 by default, hundreds of MB for the big projections), so that, as in a model's step, the weights
come from HBM rather than from the 50 MB L2 that one set would stay in; --copies 1 times the L2-resident case.
Prints a table per kernel, fastest first, and the best setting of each as a TILES entry (main() returns
them); writes bench_decode.log under $OUT when it is set. GPU only.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.kernels import decode  # noqa: E402

# d_model, d_inner, conv width, expert width, experts: the 1.5B preset, and tiny ones for --smoke
D, E, K, F, NE = 1152, 2304, 4, 3072, 8
SMOKE_SHAPES = (24, 10, 4, 20, 4)
BW = 4.8e12
LINES: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def cases(rows: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """kernel name -> (run(): the launch, check(): rel error against the twin, weight bytes)."""
    g = torch.Generator(device).manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    res = torch.randn(rows, D, device=device, generator=g)
    nw, w_in, conv_w, conv_b = rn(D), rn(2 * E, D, scale=0.03), rn(E, K, scale=0.5), rn(E)
    state = rn(rows, E, K)
    w_out, y = rn(D, E, scale=0.03), rn(rows, E)
    gate_w, gate_b = rn(NE, D, scale=0.03), rn(NE)
    h = rn(rows, D)
    w1, w2 = rn(NE, D, 2 * F, scale=0.03), rn(NE, F, D, scale=0.03)
    ids = torch.randint(0, NE, (rows, 1), device=device, generator=g)
    weights = torch.rand(rows, 1, device=device, generator=g)
    a = rn(rows, F)
    R, N = 72, 16  # dt_rank and d_state of the preset
    w_x, dt_w, dt_b = rn(R + 2 * N, E, scale=0.03), rn(E, R, scale=0.1), rn(E)
    A_log = torch.randn(E, N, device=device, generator=g) * 0.5
    Dp, z, ssm = torch.randn(E, device=device, generator=g), rn(rows, E), torch.randn(rows, E, N, device=device, generator=g)
    parts = decode.x_proj_split_k(y, w_x)

    def check_in():
        s1, s2 = state.clone(), state.clone()
        got = decode.norm_in_proj_conv(res, nw, 1e-5, w_in, s1, conv_w, conv_b)
        ref = decode.norm_in_proj_conv_ref(res, nw, 1e-5, w_in, s2, conv_w, conv_b)
        return max(rel(got[0], ref[0]), rel(got[1], ref[1]), rel(s1, s2))

    def check_out():
        return rel(decode.linear_residual_(res.clone(), y, w_out), res + y.float() @ w_out.float().T)

    def check_gate():
        got, ref = decode.norm_gate(res, nw, 1e-5, gate_w, gate_b), decode.norm_gate_ref(res, nw, 1e-5, gate_w, gate_b)
        return max(rel(got[0], ref[0]), rel(got[1], ref[1]))

    def check_up():
        return rel(decode.expert_glu_up(h, ids, w1, "swiglu"), decode.expert_glu_up_ref(h, ids, w1, "swiglu"))

    def check_down():
        got = decode.expert_down_residual_(res.clone(), a, ids, weights, w2)
        return rel(got, decode.expert_down_residual_ref_(res.clone(), a, ids, weights, w2))

    def check_x():
        return rel(decode.x_proj_split_k(y, w_x).sum(0), y.float() @ w_x.float().T)

    def check_ssm():
        s1, s2 = ssm.clone(), ssm.clone()
        got = decode.dt_proj_ssm_step(parts, dt_w, dt_b, A_log, Dp, s1, y, z)
        ref = decode.dt_proj_ssm_step_ref(parts, dt_w, dt_b, A_log, Dp, s2, y, z)
        return max(rel(got, ref), rel(s1, s2))

    def check_route_up():  # norm, top-1 routing and expert up in one launch (fused_step.ROUTE_UP)
        got = decode.route_glu_up(res, nw, 1e-5, gate_w, gate_b, "sigmoid", w1, "swiglu")
        ref = decode.route_glu_up_ref(res, nw, 1e-5, gate_w, gate_b, "sigmoid", w1, "swiglu")
        return max(rel(got[0], ref[0]), rel(got[2], ref[2])) if torch.equal(got[1], ref[1]) else float("inf")

    out = {
        "in_proj": (lambda: decode.norm_in_proj_conv(res, nw, 1e-5, w_in, state, conv_w, conv_b), check_in, 2 * E * D * 2),
        "out_proj": (lambda: decode.linear_residual_(res, y, w_out), check_out, D * E * 2),
    }
    if rows == 1:  # the gate and routed-expert kernels run at batch 1 only (more slots than experts: dense)
        out["gate"] = (lambda: decode.norm_gate(res, nw, 1e-5, gate_w, gate_b), check_gate, NE * D * 2)
        out["expert_up"] = (lambda: decode.expert_glu_up(h, ids, w1, "swiglu"), check_up, 2 * F * D * 2)
        out["expert_down"] = (lambda: decode.expert_down_residual_(res, a, ids, weights, w2), check_down, F * D * 2)
        out["x_proj"] = (lambda: decode.x_proj_split_k(y, w_x), check_x, (R + 2 * N) * E * 2)
        out["route_up"] = (lambda: decode.route_glu_up(res, nw, 1e-5, gate_w, gate_b, "sigmoid", w1, "swiglu"),
                           check_route_up, 2 * F * D * 2)
        out["ssm"] = (lambda: decode.dt_proj_ssm_step(parts, dt_w, dt_b, A_log, Dp, ssm, y, z), check_ssm,
                      E * R * 2 + E * N * 4 * 3)  # dt_proj weights, A_log, the state read and written
    return out


SWEEP_ROW = {
    "in_proj": itertools.product((4, 8, 16), (256, 512, 1024), (4, 8)),
    "out_proj": itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (1, 2, 4)),
    "gate": itertools.product((0,), (256, 512, 1024, 2048), (2, 4, 8)),
    "expert_up": itertools.product((32, 64, 128), (128, 256), (4, 8), (1, 2, 4, 8)),
    "expert_down": itertools.product((16, 32, 64, 128), (256, 512), (4, 8), (1, 2, 4, 8)),
    "x_proj": itertools.product((4, 8, 16), (128, 256, 512), (1, 2, 4)),
    "ssm": itertools.product((8, 16, 32, 64), (0,), (1, 2, 4)),
}
# kernels that run on another kernel's tiles: timed and checked at its current setting, not swept
SHARED_TILES = {"route_up": "expert_up"}
SWEEP_DOT = {
    "in_proj": [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (16, 128, 4, 4), (32, 256, 8, 2)],
    "out_proj": [(16, 128, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3)],
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--only", default=None, help="comma-separated kernels (default: all)")
    ap.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    ap.add_argument("--copies", type=int, default=24,
                    help="weight sets a timed graph cycles through (1: the weights stay in L2)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU through Triton's interpreter (TRITON_INTERPRET=1), tiny fp32 shapes: checks only, no timing")
    args = ap.parse_args(argv)
    global D, E, K, F, NE
    LINES.clear()
    decode.PDL = not args.no_pdl
    if args.smoke:
        if not decode.interpreting():
            sys.exit("error: --smoke needs TRITON_INTERPRET=1 set before Triton is imported")
        D, E, K, F, NE = SMOKE_SHAPES
        device, dtype, tol = "cpu", torch.float32, 1e-4
    elif not torch.cuda.is_available():
        sys.exit("error: bench_decode.py needs a CUDA GPU (or --smoke)")
    else:
        device, dtype, tol = "cuda", torch.bfloat16, 2e-2
    copies = 1 if args.smoke else max(1, args.copies)
    log(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, torch {torch.__version__}, "
        f"triton {triton.__version__}; PDL {'on' if decode.PDL else 'off'}; {copies} weight set(s) in turn")
    best, wrong = {}, []
    for rows in map(int, args.batches.split(",")):
        path = "row" if decode._block_m(rows) == 1 else "dot"
        sweep = SWEEP_ROW if path == "row" else SWEEP_DOT
        sets = [cases(rows, device, dtype, seed=i) for i in range(copies)]
        for name, (_, check, nbytes) in sets[0].items():
            key = SHARED_TILES.get(name, name)
            if key not in sweep or (args.only and name not in args.only.split(",")):
                continue
            launches = [cs[name][0] for cs in sets]

            def run():  # one launch per weight set: the time a launch takes is this over `copies`
                for launch in launches:
                    launch()
            default = decode.TILES[key][path]
            results = []
            # the interpreter ignores the tiles (decode._tiles): one check of the current setting
            for cfg in [default] if args.smoke or name in SHARED_TILES else sweep[key]:
                decode.TILES[key][path] = tuple(cfg)
                try:
                    err = check()
                    if not args.smoke and check() != err:  # a race between programs shows as a changed result
                        err = float("inf")
                        log(f"  {name} {cfg}: NOT DETERMINISTIC (two checks differ)")
                    us = float("nan") if args.smoke else 1e3 * triton.testing.do_bench_cudagraph(run, rep=50) / copies
                    results.append((us, cfg, err))
                except Exception as exc:  # noqa: BLE001  (a setting out of registers or shared memory)
                    log(f"  {name} {cfg}: failed: {type(exc).__name__}: {str(exc)[:120]}")
            decode.TILES[key][path] = default
            log(f"\n## {name}, batch {rows} ({path} path): weight bytes {nbytes / 1e6:.1f} MB = "
                f"{nbytes / BW * 1e6:.1f} us at 4.8 TB/s; current setting {default}")
            log("| setting | us | rel err vs twin |\n|---|---:|---:|")
            for us, cfg, err in sorted(results):
                flag = "" if err < tol else " WRONG"
                log(f"| {cfg}{' (current)' if tuple(cfg) == tuple(default) else ''} | {us:.2f} | {err:.1e}{flag} |")
            wrong += [(name, rows, cfg) for _, cfg, err in results if not err < tol]
            ok = [r for r in sorted(results) if r[2] < tol]
            if ok and name not in SHARED_TILES:
                best.setdefault(name, {})[path] = tuple(ok[0][1])
    log("\nbest settings: " + repr(best))
    if wrong:
        log(f"WRONG against the twin: {wrong}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_decode.log").write_text("\n".join(LINES) + "\n")
    return best if not wrong else {}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
