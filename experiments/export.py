"""The platform's own weights format: a folder of model.safetensors + config.json, no pickle anywhere.

    python -m experiments.export ckpt=outputs/runs/<id>/checkpoints/best.ckpt out=exports/my-model
    python -m experiments.export ckpt=Zyphra/BlackMamba-2.8B out=exports/blackmamba-2.8b

ckpt is anything experiments.generation.load_model reads (a Lightning checkpoint, a folder or hub id of a
released BlackMamba, an HF Mamba, or an export). config.json holds {"format": "blackmamba-lab",
"format_version": 1, "vocab_size", "run_config" (the resolved run config the model is built from),
"source", "params_total"}; model.safetensors holds the LM's state dict (the tied head is the embedding,
stored once). A tokenizer.json that the model was read with is copied beside them, so the folder is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from blocks.model import LM
from experiments.build import build_model
from experiments.checkpoint import CheckpointError, atomic_write_text
from experiments.weights import folder_tokenizer, import_optional, read_weights

KIND = "blackmamba-lab"
FORMAT_VERSION = 1


def is_export(config: dict) -> bool:
    return config.get("format") == KIND


def save_export(model: LM, run_config: dict, out_dir: str | Path, source: str = "") -> Path:
    """Write `model` (built from `run_config`) as model.safetensors + config.json in out_dir; returns out_dir.

    Each file is written under a temporary name and renamed, config.json last: a folder with a config.json
    is complete."""
    safetensors_torch = import_optional("safetensors.torch")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_config = OmegaConf.to_container(OmegaConf.create(run_config), resolve=True)
    tokenizer = Path(str(run_config["data"]["tokenizer"])).expanduser()
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if tokenizer.is_file():
        if tokenizer.resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tokenizer, out / "tokenizer.json.tmp")
            os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
        run_config["data"]["tokenizer"] = "tokenizer.json"  # the loader reads the folder's tokenizer.json
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    config = {"format": KIND, "format_version": FORMAT_VERSION, "vocab_size": model.cfg.vocab_size,
              "run_config": run_config, "source": str(source),
              "params_total": sum(p.numel() for p in model.parameters())}
    atomic_write_text(out / "config.json", json.dumps(config, indent=1) + "\n")
    return out


def load_export(folder: str | Path, config: dict) -> tuple[LM, dict]:
    """The exported model (fp32, CPU) and what describes it (kind, run_config, vocab_size, source)."""
    folder = Path(folder)
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}/config.json: format_version {config.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    run_config = config["run_config"]
    run_config["data"]["tokenizer"] = folder_tokenizer(folder, run_config["data"]["tokenizer"])
    model = build_model(OmegaConf.create(run_config), config["vocab_size"])
    state = read_weights(folder)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        raise CheckpointError(f"{folder}/model.safetensors does not fit its config.json: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}, shapes that differ {misshapen[:8]}")
    model.load_state_dict(state)
    info = {"kind": KIND, "source": config.get("source") or str(folder), "run_config": run_config,
            "vocab_size": config["vocab_size"]}
    return model, info


def main(argv: list[str]) -> int:
    args = dict(token.partition("=")[::2] for token in argv)
    if "-h" in argv or "--help" in argv or set(args) != {"ckpt", "out"} or not all(args.values()):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 0 if "-h" in argv or "--help" in argv else 2
    from experiments.generation import load_model  # imports every loader

    try:
        with torch.no_grad():
            model, info = load_model(args["ckpt"])
            out = save_export(model, info["run_config"], args["out"], source=info.get("source", args["ckpt"]))
    except (CheckpointError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
