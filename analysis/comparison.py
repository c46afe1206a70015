"""Routers side by side: the utilization metrics and validation loss of several MoE runs on the same data."""
from __future__ import annotations

import math

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from analysis.runs import metric_history, moe_layer_names, run_label

VAL_KEYS = ("val/bpb", "val/bits_per_token", "val/loss")
VAL_UNITS = {"val/bpb": "bits per byte", "val/bits_per_token": "bits per token", "val/loss": "nats per token"}


def val_key(runs: list[Run]) -> str:
    """The validation metric every run has, bits per byte first (comparable across tokenizers)."""
    for key in VAL_KEYS:
        if runs and all(key in r.data.metrics for r in runs):
            return key
    return "val/loss"


def router_rows(c: MlflowClient, runs: list[Run]) -> list[dict]:
    """One row per finished MoE run: label (router and start of the run id), name, data, router, mean load CV over layers at
    each validation (cv_steps, cv_mean), final per-layer load CV, final entropies and drop rate (means
    over layers), and the final validation metric (val, val_key)."""
    runs = [r for r in runs if r.info.status == "FINISHED" and moe_layer_names(r)]
    key = val_key(runs)
    rows = []
    for run in runs:
        layers = moe_layer_names(run)
        m = run.data.metrics
        curves = [metric_history(c, run.info.run_id, f"moe/{layer}/load_cv") for layer in layers]
        steps = curves[0][0]
        cv_mean = np.nanmean(np.stack([v for s, v in curves if len(s) == len(steps)]), axis=0)

        def mean_final(stat: str) -> float:
            values = [m[f"moe/{layer}/{stat}"] for layer in layers if f"moe/{layer}/{stat}" in m]
            return float(np.nanmean(values)) if values else math.nan

        router = run.data.tags.get("router", run.data.params.get("router.name", "?"))
        rows.append({
            "run_id": run.info.run_id, "label": f"{router} {run.info.run_id[:6]}", "name": run_label(run), "router": router,
            "data": run.data.tags.get("data", ""), "cv_steps": steps, "cv_mean": cv_mean,
            "final_cv": {layer: m.get(f"moe/{layer}/load_cv", math.nan) for layer in layers},
            "load_cv": mean_final("load_cv"), "router_entropy": mean_final("router_entropy"),
            "load_entropy": mean_final("load_entropy"), "drop_rate": mean_final("drop_rate"),
            "val": m.get(key, math.nan), "val_key": key,
        })
    return rows
