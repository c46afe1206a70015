"""Expert utilization of any model on any text, without training: a training run's report for any checkpoint.

    python -m analysis.route ckpt=<checkpoint> [data=<source> path=... seq_len=... batch_size=... data.*=...]
                             [split=val|train] [out=DIR] [device=auto|cpu|cuda] [format=html|md] [--plugin FILE]

ckpt: whatever experiments.generation.load_model reads: a run's .ckpt, a safetensors export, a released
BlackMamba or Hugging Face Mamba folder, or a hub id. data: run.py's data options (conf/data/*.yaml, data.*
keys and the path / seq_len / batch_size aliases); the text is tokenized with the model's own tokenizer
unless data.tokenizer is given. A model with a plug-in mixer or router needs its file (--plugin FILE or
$BLACKMAMBA_PLUGINS, see experiments/plugins.py). With data=stdlib and a subword tokenizer, the standard library's files of
the chosen split are tokenized with it (data=stdlib is otherwise byte-level).

The model runs, in eval mode, over the fixed windows validation uses (data.val_batches batches of
data.batch_size x data.seq_len spread over the split). Eval mode routes as inference does: causally
(Sinkhorn takes the argmax of the gate, expert-choice falls back to top-k), dropless. Each MoE layer's
router output feeds the very counters training fills (MoE._update_utilization), so the metrics and figures
are those of a training run's report. Written to out (default outputs/route/<checkpoint>): report.html or
report.md with figures/, utilization.npz (a training snapshot's layout, see experiments/utilization.py)
and summary.json (loss, bits per byte or per token, per-layer statistics), for side-by-side comparisons.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from analysis import plots
from analysis.metrics import byte_label, layer_summary, top_tokens_table
from analysis.report import Section, write_html, write_markdown
from analysis.runs import layer_arrays, load_matrix
from blocks.accounting import account
from blocks.model import LM, next_token_loss
from experiments.checkpoint import CheckpointError
from experiments.config import ConfigError, compose
from experiments.data import SEPARATOR, DataConfig, ValBatches, load_source, split_by_name, stdlib_files
from experiments.plugins import load_plugins, split_plugin_args
from experiments.tokenizers import build_tokenizer
from experiments.utilization import moe_layers, save_snapshot, snapshot_arrays

ROUTE_ARGS = {"ckpt": None, "out": None, "split": "val", "device": "auto", "format": "html"}
DATA_ALIASES = ("path", "seq_len", "batch_size")
STATS = (("load_cv", "load CV"), ("max_over_mean_load", "max / mean load"), ("load_entropy", "load entropy"),
         ("router_entropy", "router entropy"), ("drop_rate", "drop rate"))


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(route's own arguments, the data arguments for experiments.config.compose)."""
    args, data_argv = dict(ROUTE_ARGS), []
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got '{token}'")
        if key in ROUTE_ARGS:
            args[key] = value
        elif key == "data" or key.startswith("data.") or key in DATA_ALIASES:
            data_argv.append(token)
        else:
            raise ConfigError(f"unknown argument '{key}': analysis.route takes {', '.join(ROUTE_ARGS)} and data options "
                              f"(data=<source>, data.<key>=..., {', '.join(DATA_ALIASES)})")
    if not args["ckpt"]:
        raise ConfigError("give a checkpoint: ckpt=<.ckpt file, folder or hub id>")
    if args["split"] not in ("val", "train") or args["format"] not in ("html", "md"):
        raise ConfigError("split must be val or train, format html or md")
    return args, data_argv


def data_config(data_argv: list[str], model_tokenizer: str) -> DictConfig:
    """The data node of the composed config, with the model's tokenizer unless data.tokenizer is given."""
    data = compose(data_argv).data
    if not any(token.startswith("data.tokenizer=") for token in data_argv):
        data.tokenizer = model_tokenizer
    return data


def _stdlib_subword(data: DictConfig, split: str) -> tuple[np.ndarray, float, str]:
    """The stdlib files of `split` (data=stdlib's by-file split) tokenized with a subword tokenizer."""
    tok = build_tokenizer(data.tokenizer)
    root, files = stdlib_files()
    is_val = split_by_name([rel for rel, _ in files], data.val_fraction)
    texts = [p.read_text(encoding="utf-8", errors="replace") for (_, p), v in zip(files, is_val) if v == (split == "val")]
    text = SEPARATOR.decode().join(texts)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    return ids, len(text.encode("utf-8")) / max(len(ids), 1), f"{len(texts)} stdlib files under {root}, {data.tokenizer}"


def load_tokens(data: DictConfig, split: str) -> tuple[np.ndarray, float | None, str]:
    """(tokens of the split, bytes per token or None, description) for the data config."""
    if data.name == "stdlib" and data.tokenizer != "byte":
        return _stdlib_subword(data, split)
    source = load_source(DataConfig(**OmegaConf.to_container(data, resolve=True)))
    return getattr(source, split), source.bytes_per_token, f"data={source.name}: {source.detail}"


@torch.no_grad()
def route(model: LM, batches, device: str | torch.device) -> tuple[dict[str, np.ndarray], float, int]:
    """Run the model over (x, y) batches in eval mode, counting each MoE layer's routing as training does.

    Returns (the counters as a snapshot's arrays, mean next-token loss in nats, tokens)."""
    model.eval()
    layers = moe_layers(model)
    current: dict[str, torch.Tensor] = {}

    def counter(moe):
        def count(router, inputs, routing) -> None:
            moe._update_utilization(routing, routing.mask_TK, current["ids"])
        return count

    for moe in layers.values():
        moe.reset_utilization()
        moe.track_tokens(model.cfg.vocab_size)
    handles = [moe.router.register_forward_hook(counter(moe)) for moe in layers.values()]
    nll, n = 0.0, 0
    try:
        for x_BL, y_BL in batches:
            x_BL, y_BL = x_BL.to(device), y_BL.to(device)
            current["ids"] = x_BL.reshape(-1)
            logits_BLV, _ = model(x_BL)
            nll += next_token_loss(logits_BLV, y_BL, reduction="sum").item()
            n += y_BL.numel()
    finally:
        for handle in handles:
            handle.remove()
    return snapshot_arrays(layers, step=0), nll / max(n, 1), n


def _sections(snap: dict, layers: list[str], label, fig_dir: Path, title: str) -> list[Section]:
    """Per-layer statistics, load heatmap, co-activation and top tokens: the training report's sections."""
    arrays = {layer: layer_arrays(snap, layer) for layer in layers}
    table = [["layer", *(name for _, name in STATS), "tokens"]]
    for layer, a in arrays.items():
        s = layer_summary(a)
        table.append([layer, *(f"{s[key]:.4g}" for key, _ in STATS), str(int(a["num_tokens"]))])
    stats = Section("Routing statistics per layer", "Definitions as in training: load CV = std / mean of the slots per "
                    "expert, load entropy of the aggregate load and mean router entropy per token (both / log E, "
                    "1 = uniform). Eval routing is dropless.", table=table)
    heatmap = plots.load_heatmap(load_matrix([snap], layers), layers, f"{title}: expert load")
    load = Section("Expert load", "Slots each expert processed, over the uniform load (1 = balanced).",
                   [plots.save(heatmap, fig_dir / "load_heatmap.png")])
    co = {layer: a["coactivation"] for layer, a in arrays.items()}
    coactivation = Section("Expert co-activation", "Each token had a single expert (top-1 routing): the co-activation "
                           "matrix is diagonal, so there is nothing to plot.")
    if any((c - np.diag(np.diag(c))).sum() > 0 for c in co.values()):
        coactivation.text = "How often expert j also processes a token that expert i processes."
        coactivation.figures.append(plots.save(plots.coactivation_heatmaps(co, f"{title}: expert co-activation"),
                                               fig_dir / "coactivation.png"))
    tables = [f"{layer}\n{top_tokens_table(a['token_expert'], 8, label, a['token_counts'])}" for layer, a in arrays.items()]
    tokens = Section("Expert specialisation by token", "Per expert: share of all slots, then its most frequent tokens "
                     "with their share of the expert's slots and p = P(expert | token).", pre="\n\n".join(tables))
    return [stats, load, coactivation, tokens]


def _default_out(ckpt: str) -> Path:
    return Path("outputs") / "route" / re.sub(r"[^\w.-]+", "_", ckpt.strip("/"))[-96:]


def build_route_report(argv: list[str]) -> Path:
    """Everything `python -m analysis.route` does; returns the report file."""
    from experiments.generation import load_model  # imported late: it pulls in Lightning (seconds)

    args, data_argv = parse_args(argv)
    device = args["device"] if args["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(args["ckpt"], device)
    model_tokenizer = OmegaConf.create(info["run_config"]).data.tokenizer
    data = data_config(data_argv, model_tokenizer)
    tokens, bytes_per_token, detail = load_tokens(data, args["split"])
    if len(tokens) and int(tokens.max()) >= model.cfg.vocab_size:
        raise ConfigError(f"token id {int(tokens.max())} of tokenizer {data.tokenizer} is outside the model's vocabulary "
                          f"({model.cfg.vocab_size}); give the model's tokenizer (data.tokenizer=...)")
    batches = ValBatches(tokens, data.seq_len, data.batch_size, data.val_batches)
    snap, loss, n_tokens = route(model, batches, device)

    out = Path(args["out"]) if args["out"] else _default_out(args["ckpt"])
    out.mkdir(parents=True, exist_ok=True)
    save_snapshot(out / "utilization.npz", snap)
    layers = [str(layer) for layer in snap["layers"]]
    acc = account(model, data.seq_len)
    bits = {"bits_per_byte": loss / math.log(2) / bytes_per_token} if bytes_per_token else {"bits_per_token": loss / math.log(2)}
    summary = {"ckpt": args["ckpt"], "kind": info.get("kind", "lightning"), "data": detail, "split": args["split"],
               "tokenizer": data.tokenizer, "tokens": n_tokens, "loss": loss, **bits,
               "params_total": acc.total_params, "params_active": acc.active_params,
               "layers": {layer: layer_summary(layer_arrays(snap, layer)) for layer in layers}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    title = f"Expert utilization of {args['ckpt']}"
    rows = [["checkpoint", f"{args['ckpt']} ({summary['kind']})"],
            ["parameters total / active", f"{acc.total_params:,} / {acc.active_params:,}"],
            ["text", f"{detail}; {args['split']} split, tokenizer {data.tokenizer}"],
            ["tokens routed", f"{n_tokens:,} ({len(batches)} batches of {data.batch_size} x {data.seq_len})"],
            ["loss", f"{loss:.4f} nats/token, " + ", ".join(f"{v:.4f} {k.replace('_', ' ')}" for k, v in bits.items())]]
    overview = Section("Model and text", "Eval-mode routing, as at inference (causal, dropless).", table=[["", ""], *rows])
    if not layers:
        overview.text = "This model has no MoE layer: there is no expert utilization to show."
        sections = [overview]
    else:
        tok = build_tokenizer(data.tokenizer)
        label = byte_label if data.tokenizer == "byte" else (lambda v: repr(tok.decode([v])))
        sections = [overview, *_sections(snap, layers, label, out / "figures", str(args["ckpt"]))]
    if args["format"] == "md":
        return write_markdown(title, sections, out / "report.md")
    return write_html(title, sections, out / "report.html")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[1])
        return 0
    try:
        plugin_files, argv = split_plugin_args(argv)
        load_plugins(plugin_files)
        print(build_route_report(argv))
    except (ConfigError, CheckpointError, ValueError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
