"""A short real run on one GPU: BlackMamba, Mamba and a transformer trained for the same tokens on the built-in
corpus, their validation bits per byte next to xz -9e on the same validation text.

    python benchmarks/real_run.py [--steps N] [--out-dir DIR]     # conf/experiment/gpu_*.yaml, a few minutes
    python benchmarks/real_run.py --smoke                         # the *_small presets shrunk, CPU, seconds

Each preset trains through experiments.train.train(compose([...])), which is run.py's path, tracked in an MLflow
SQLite store under the out dir (checkpoints too, which is why it defaults to a folder outside $OUT). The three
presets share sizes, data and token budget, so their val/bpb compare the architectures.

xz -9e (lzma preset 9 | PRESET_EXTREME) is measured on exactly the validation windows the runs were evaluated on
(the stdlib corpus's val split, cut by experiments.data.ValBatches), on the whole val split, and on the first
5 MB of the corpus (its train split). A compressor sees only the text it compresses while the models learned
from the train split, so xz on the val windows is a reference point, not a like-for-like contest.
Table last; real_run.json, real_run.log and the MLflow store under $OUT when it is set.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.config import compose  # noqa: E402
from experiments.data import DataConfig, ValBatches, load_source  # noqa: E402
from experiments.tracking import open_store, tracking_uri  # noqa: E402
from experiments.train import train  # noqa: E402

PRESETS = ("gpu_blackmamba", "gpu_mamba", "gpu_transformer")
SMOKE_PRESETS = ("blackmamba_small", "mamba_small", "transformer_small")
SMOKE = ("model=tiny", "data.seq_len=32", "data.batch_size=4", "data.val_batches=2", "trainer.max_steps=2",
         "trainer.val_every=2", "trainer.log_every=1", "trainer.accelerator=cpu")
CORPUS_PREFIX = 5_000_000  # bytes of the corpus for the xz reference point that DESIGN quotes (1.14)
SMOKE_CORPUS_PREFIX = 100_000  # xz -9e runs at about 1 MB/s: the smoke run keeps it short


def log(out: Path | None, msg: str) -> None:
    print(msg, flush=True)
    if out is not None:
        with (out / "real_run.log").open("a") as f:
            f.write(msg + "\n")


def xz_bpb(data: bytes) -> float:
    """Bits per byte of `data` under xz -9e."""
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


def val_text(data: DataConfig) -> tuple[bytes, bytes, np.ndarray]:
    """(the evaluated val windows concatenated, the whole val split) as bytes, and the train split's tokens. The
    windows are the ones ValBatches hands the validation loop, seq_len + 1 tokens each (inputs and last target)."""
    src = load_source(data)
    if src.vocab_size != 256 or src.bytes_per_token != 1.0:
        raise ValueError(f"xz is compared per byte: data={data.name} is not byte-level")
    starts = ValBatches(src.val, data.seq_len, data.batch_size, data.val_batches).starts
    windows = np.concatenate([np.asarray(src.val[s : s + data.seq_len + 1]) for s in starts])
    return windows.astype(np.uint8).tobytes(), np.asarray(src.val, np.uint8).tobytes(), src.train


def argv_for(preset: str, args: argparse.Namespace, out_dir: Path) -> list[str]:
    argv = [f"experiment={preset}", f"out_dir={out_dir}", f"tracking.uri=sqlite:///{out_dir / 'mlflow.db'}",
            "trainer.progress_bar=false"]
    if args.smoke:
        argv += list(SMOKE)
    if args.steps:  # one validation, at the end, so val/bpb is always the trained model's
        argv += [f"trainer.max_steps={args.steps}", f"trainer.val_every={args.steps}"]
    return argv


def train_one(preset: str, args: argparse.Namespace, out_dir: Path, out: Path | None) -> dict:
    cfg = compose(argv_for(preset, args, out_dir))
    log(out, f"\n== {preset}: python run.py {' '.join(argv_for(preset, args, out_dir))}")
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    params = open_store(tracking_uri(cfg)).get_run(result.run_id).data.params  # what the run logged
    tokens = cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches
    return {"preset": preset, "run_id": result.run_id, "params_total": int(params["params_total"]),
            "params_active": int(params["params_active"]), "tokens": tokens, "wall_s": wall,
            "tokens_per_s_wall": tokens / wall, "tokens_per_s_trainer": result.metrics.get("train/tokens_per_s"),
            "val_bpb": result.metrics["val/bpb"], "train_loss": result.metrics.get("train/loss"),
            "data": OmegaConf.to_container(cfg.data, resolve=True)}


def millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e6:.3f}M"


def table(rows: list[dict], xz: dict, out: Path | None) -> None:
    log(out, "\n| preset | params total / active | tokens trained | wall s | tokens/s (wall) | tokens/s (training) "
             "| val bpb | xz -9e bpb, same val text |")
    log(out, "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        trainer_tps = f"{r['tokens_per_s_trainer']:,.0f}" if r["tokens_per_s_trainer"] else "-"
        log(out, f"| {r['preset']} | {millions(r['params_total'])} / {millions(r['params_active'])} | "
                 f"{r['tokens']:,} | {r['wall_s']:.0f} | {r['tokens_per_s_wall']:,.0f} | {trainer_tps} | "
                 f"{r['val_bpb']:.3f} | {xz['val_windows_bpb']:.3f} |")
    log(out, f"xz -9e: {xz['val_windows_bpb']:.3f} bpb on the {xz['val_windows_bytes']:,} bytes of val windows; "
             f"{xz['val_split_bpb']:.3f} on the whole val split ({xz['val_split_bytes']:,} bytes); "
             f"{xz['corpus_prefix_bpb']:.3f} on the first {xz['corpus_prefix_bytes']:,} bytes of the corpus")


def measure_xz(data: dict, prefix: int, out: Path | None) -> dict:
    t0 = time.perf_counter()
    windows, split, train_tokens = val_text(DataConfig(**data))
    head = np.asarray(train_tokens[:prefix], np.uint8).tobytes()
    xz = {"val_windows_bytes": len(windows), "val_windows_bpb": xz_bpb(windows),
          "val_split_bytes": len(split), "val_split_bpb": xz_bpb(split),
          "corpus_prefix_bytes": len(head), "corpus_prefix_bpb": xz_bpb(head)}
    log(out, f"xz -9e measured in {time.perf_counter() - t0:.0f} s")
    return xz


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the *_small presets shrunk to a tiny model, CPU, 2 steps")
    ap.add_argument("--steps", type=int, help="override every preset's trainer.max_steps (same for all)")
    ap.add_argument("--out-dir", help="runs, checkpoints and the MLflow store (default: a folder under /tmp)")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    args = parse_args(argv)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "real_run.log").write_text("")
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="blackmamba-real-run-")).resolve()
    presets = SMOKE_PRESETS if args.smoke else PRESETS
    rows = [train_one(p, args, out_dir, out) for p in presets]
    if any(r["data"] != rows[0]["data"] for r in rows):
        raise ValueError("the presets differ in their data settings: their val bpb would not be on the same text")
    xz = measure_xz(rows[0]["data"], SMOKE_CORPUS_PREFIX if args.smoke else CORPUS_PREFIX, out)
    table(rows, xz, out)
    log(out, f"MLflow store: sqlite:///{out_dir / 'mlflow.db'}")
    if out is not None:
        (out / "real_run.json").write_text(json.dumps({"runs": rows, "xz": xz}, indent=1))
        shutil.copy(out_dir / "mlflow.db", out / "real_run_mlflow.db")
    return rows, xz


if __name__ == "__main__":
    main()
