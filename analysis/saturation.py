"""Router saturation (OLMoE, Muennighoff et al. 2024, sec. 5.2): how much the routing at step t agrees with
the final routing, per layer, on the same tokens.

Two sources, both eval-mode routing (the causal rule every router uses at inference):
- snapshots: each validation records the experts of the first (fixed) validation batch, so agreement with
  the last validation is available at every validation step. This is the main measurement.
- checkpoints: a fixed token batch routed through the model of each checkpoint file. The train loop keeps
  only last.ckpt and best.ckpt, so this gives at most one earlier point (none when best is last).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis.metrics import routing_agreement
from experiments.utilization import moe_layers, record_routing


def snapshot_saturation(snapshots: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps, layer -> agreement of each snapshot's val-batch routing with the last snapshot's).

    Only snapshots that recorded routing on the same tokens as the last one count."""
    recorded = [s for s in snapshots if "val_token_ids" in s]
    if not recorded:
        return np.array([], dtype=np.int64), {}
    final = recorded[-1]
    same = [s for s in recorded if np.array_equal(s["val_token_ids"], final["val_token_ids"])]
    layers = [str(name) for name in final["layers"] if f"{name}/val_expert_ids" in final]
    steps = np.array([int(s["step"]) for s in same], dtype=np.int64)
    return steps, {layer: np.array([routing_agreement(s[f"{layer}/val_expert_ids"], final[f"{layer}/val_expert_ids"])
                                    for s in same]) for layer in layers}


@torch.no_grad()
def checkpoint_routing(ckpt: str | Path, token_ids_BL: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
    """(global step, layer -> expert ids (B*L, K)) of the tokens routed by the checkpoint's model in eval mode."""
    from experiments.generation import load_model  # imported late: it pulls in Lightning (seconds)

    model, state = load_model(ckpt)
    with record_routing(moe_layers(model)) as routing:
        model(torch.as_tensor(np.asarray(token_ids_BL), dtype=torch.long))
    return int(state.get("global_step", -1)), {k: v.numpy() for k, v in routing.items()}


def checkpoint_saturation(ckpts: list[str | Path], token_ids_BL: np.ndarray) -> list[tuple[str, int, dict[str, float]]]:
    """[(checkpoint name, step, layer -> agreement with the latest checkpoint)], by step."""
    routed = sorted(((Path(p).name, *checkpoint_routing(p, token_ids_BL)) for p in ckpts), key=lambda r: r[1])
    if not routed:
        return []
    final = routed[-1][2]
    return [(name, step, {layer: routing_agreement(ids, final[layer]) for layer, ids in layers.items()})
            for name, step, layers in routed]
