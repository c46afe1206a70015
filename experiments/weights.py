"""Weights from outside a training run: folders of config.json + tensor files, local or on the Hugging Face hub.

A folder holds config.json and one of WEIGHT_FILES (a *.index.json lists the shards of a sharded checkpoint).
Nothing is unpickled: safetensors files hold only tensors, and pytorch_model.bin is read with
torch.load(weights_only=True), which refuses any pickled object other than tensors, containers and plain values.
StateMapper moves tensors from a foreign layout to the platform's parameter names and refuses, naming
them, every missing, misshapen or unmapped tensor.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from blocks.model import ModelConfig
from experiments.checkpoint import CheckpointError

# In the order they are looked for: safetensors before pickle-format files.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SHARD_PATTERNS = {"model.safetensors.index.json": "model-*.safetensors", "pytorch_model.bin.index.json": "pytorch_model-*.bin"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_HINT = "pip install -e '.[hf]'"


def import_optional(name: str):
    """The module `name` of an optional package, or an ImportError with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"this needs the '{name.split('.')[0]}' package: {HF_HINT}") from e


def resolve(ref: str | Path) -> Path:
    """The local folder `ref` names: a folder, the folder of a file in it (config.json, a weight file), or
    a hub id ('Zyphra/BlackMamba-2.8B') fetched into the Hugging Face cache (config, tokenizer, weights only)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if not HUB_ID.match(str(ref)):
        raise CheckpointError(f"checkpoint not found: {ref}")
    return _hub_snapshot(str(ref))


def _needs(name: str, what: str):
    """import_optional for reading a checkpoint: a missing package is reported as a CheckpointError."""
    try:
        return import_optional(name)
    except ImportError as e:
        raise CheckpointError(f"{what}: {e}") from None


def _hub_snapshot(repo_id: str) -> Path:
    hub = _needs("huggingface_hub", f"'{repo_id}' is no local path; fetching it from the Hugging Face hub")
    try:
        files = set(hub.list_repo_files(repo_id))
    except Exception as e:  # offline, unknown repository, gated model
        raise CheckpointError(f"'{repo_id}' is no local path, and the Hugging Face hub did not list it "
                              f"({type(e).__name__}: {e})") from None
    weights = next((name for name in WEIGHT_FILES if name in files), None)
    if weights is None or "config.json" not in files:
        raise CheckpointError(f"hub repository {repo_id} has no config.json and weights ({', '.join(WEIGHT_FILES)})")
    patterns = ["config.json", "tokenizer.json", weights] + ([SHARD_PATTERNS[weights]] if weights in SHARD_PATTERNS else [])
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the connection dropped, the disk is full
        raise CheckpointError(f"downloading {repo_id} from the Hugging Face hub failed ({type(e).__name__}: {e})") from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} holds no config.json: not a checkpoint folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def load_torch_file(path: Path) -> dict:
    """torch.load(weights_only=True) on the CPU (memory-mapped when the file allows), errors naming the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # a legacy (non-zip) file cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or a pickle holding more than tensors
        raise CheckpointError(f"{path} is corrupt, truncated or holds more than tensors (it is loaded with "
                              f"weights_only=True; {type(e).__name__}: {e})") from None


def _load_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        safetensors_torch = _needs("safetensors.torch", f"reading {path}")
        try:
            return safetensors_torch.load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    state = load_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # Megatron-style {"model": state_dict}
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (nor {{'model': state_dict}})")
    return state


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's checkpoint, by its key in the file (shards merged)."""
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise CheckpointError(f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if not name.endswith(".index.json"):
        return _load_file(folder / name)
    index = json.loads((folder / name).read_text())
    state: dict[str, Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        if not (folder / shard).is_file():
            raise CheckpointError(f"{folder / name} lists the shard {shard}, which is not in {folder}")
        state.update(_load_file(folder / shard))
    return state


def folder_tokenizer(folder: Path, default: str) -> str:
    """The folder's tokenizer.json when it has one, else `default` (a path, hub id or 'byte')."""
    path = folder / "tokenizer.json"
    return str(path.resolve()) if path.is_file() else default


def run_config(model: ModelConfig, mixer: dict, moe: dict | None, tokenizer: str) -> DictConfig:
    """A complete, checked run config (what a training run saves) for a Mamba (+ Sinkhorn MoE) model read
    from elsewhere: the defaults with `model` replaced and `mixer` / `moe` fields and the tokenizer set."""
    from experiments.config import compose  # the config system reads conf/ on import

    cfg = compose(["mixer=mamba", "router=sinkhorn"])
    cfg.model = OmegaConf.structured(model)
    for key, value in mixer.items():
        cfg.mixer[key] = value
    for key, value in (moe or {}).items():
        cfg.moe[key] = value
    cfg.data.tokenizer = tokenizer
    if tokenizer != "byte":
        cfg.data.name = "text"  # stdlib data is byte-level only
    return cfg


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


class StateMapper:
    """Moves tensors from `state` (a foreign checkpoint) to the names of `model`'s state dict.

    take(key, shape) pops a source tensor after checking its shape; put(target, tensor) places it. finish()
    raises one CheckpointError naming every missing source key, every shape that does not fit and every
    source key left over, or returns the complete state dict for model.load_state_dict(strict=True).
    """

    def __init__(self, state: dict[str, Tensor], model: nn.Module, source: str):
        self.source, self.left = source, dict(state)
        self.expected = model.state_dict()
        self.out: dict[str, Tensor] = {}
        self.missing: list[str] = []
        self.misshapen: list[str] = []

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor | None:
        if key not in self.left:
            self.missing.append(key)
            return None
        t = self.left.pop(key)
        if tuple(t.shape) != tuple(shape):
            self.misshapen.append(f"{key} is {_shape(t)}, the config needs {'x'.join(map(str, shape))}")
            return None
        return t

    def put(self, target: str, tensor: Tensor | None) -> None:
        if tensor is not None:
            self.out[target] = tensor

    def copy(self, key: str, target: str) -> None:
        """The same tensor under a new name, with the shape the model has there."""
        self.put(target, self.take(key, tuple(self.expected[target].shape)))

    def drop(self, key: str) -> None:
        self.left.pop(key, None)

    def finish(self) -> dict[str, Tensor]:
        problems = []
        for what, keys in (("missing tensors", self.missing), ("shapes that do not fit", self.misshapen),
                           ("tensors with no place in the model", sorted(self.left))):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"{what}: {shown}")
        if problems:
            raise CheckpointError(f"{self.source} does not fit its config: " + "; ".join(problems))
        unfilled = sorted(set(self.expected) - set(self.out))
        assert not unfilled, f"mapping leaves model tensors unset: {unfilled[:5]}"
        return self.out
