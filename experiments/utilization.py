"""Expert-utilization snapshots: every MoE layer's raw counters, saved as one .npz per validation.

A snapshot covers the training steps since the previous validation (the counters update in training only
and are reset after each snapshot). Layout of utilization/step_<global step, 6 digits>.npz:

    step                          the trainer's global step at the validation
    layers, aux_names             MoE layer names ("layer1", "layer3", ...) and MoE.AUX_LOSS_NAMES
    <layer>/<counter>             MoE.utilization_arrays(): tokens_per_expert (E), coactivation (E, E),
                                  token_expert (V, E), token_counts (V), router_prob_sum (E), aux_loss_sum and
                                  aux_loss_count (A), and the scalars dropped_tokens, routed_slots,
                                  tokens_without_expert, num_tokens, router_entropy_sum
    val_token_ids                 (B, L) the first validation batch (the same tokens at every validation)
    <layer>/val_expert_ids        (B*L, K) the eval-mode experts each of those tokens was routed to
                                  (-1 for an empty slot): comparing them across steps measures router
                                  saturation (OLMoE, Muennighoff et al. 2024, sec. 5.2)
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from blocks.moe import MoE
from routers import Routing

SNAPSHOT_DIR = "utilization"


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The model's MoE layers by name, f"layer{i}" with i the block index (as logged: moe/layer1/...)."""
    return {f"layer{i}": block.mlp for i, block in enumerate(model.layers) if isinstance(getattr(block, "mlp", None), MoE)}


@contextmanager
def record_routing(layers: Mapping[str, MoE]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, every forward of a layer's router stores its expert ids (T, K) on the CPU under the
    layer's name (the last forward wins), with -1 in empty slots."""
    recorded: dict[str, Tensor] = {}

    def hook(name: str):
        def store(module, inputs, routing: Routing) -> None:
            ids_TK = routing.expert_ids_TK.detach()
            if routing.mask_TK is not None:
                ids_TK = torch.where(routing.mask_TK, ids_TK, -1)
            recorded[name] = ids_TK.cpu()
        return store

    handles = [moe.router.register_forward_hook(hook(name)) for name, moe in layers.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def snapshot_arrays(
    layers: Mapping[str, MoE], step: int, val_token_ids: Tensor | None = None,
    val_expert_ids: Mapping[str, Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of one snapshot (see the module docstring)."""
    arrays = {"step": np.array(step), "layers": np.array(list(layers), dtype=str),
              "aux_names": np.array(MoE.AUX_LOSS_NAMES, dtype=str)}
    for name, moe in layers.items():
        for key, value in moe.utilization_arrays().items():
            arrays[f"{name}/{key}"] = value.numpy()
        if val_expert_ids and name in val_expert_ids:
            arrays[f"{name}/val_expert_ids"] = val_expert_ids[name].numpy()
    if val_token_ids is not None:
        arrays["val_token_ids"] = val_token_ids.detach().cpu().numpy()
    return arrays


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:06d}.npz"


def save_snapshot(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """np.savez_compressed to a temporary file, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_snapshot(path: str | Path) -> dict[str, np.ndarray]:
    """A snapshot's arrays by key (no pickles are loaded)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
