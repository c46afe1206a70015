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


def arm_name(run: Run) -> str:
    """What a comparison calls the run: its tracking.run_name when one was given (an experiment's arm, e.g.
    aux_free), else its router's name."""
    name = run.data.params.get("tracking.run_name")
    if name and name != "None":
        return name
    return run.data.tags.get("router", run.data.params.get("router.name", "?"))


def mean_metric(c: MlflowClient, run: Run, key: str) -> float:
    """The mean of every value a run logged for `key` (nan if none): throughput over the whole run rather than
    its last logging window."""
    _, values = metric_history(c, run.info.run_id, key)
    return float(values.mean()) if len(values) else math.nan


def router_rows(c: MlflowClient, runs: list[Run]) -> list[dict]:
    """One row per finished MoE run: label (arm name and start of the run id), arm (`arm_name`), name, data,
    router, mean load CV over layers at each validation (cv_steps, cv_mean), final per-layer load CV, final
    load statistics (means over layers: load_cv, max_over_mean_load, router_entropy, load_entropy, drop_rate,
    no_expert_rate), training throughput (tokens_per_s: the mean of train/tokens_per_s over the run), tokens
    trained on (tokens_total), parameters (params_total, params_active), and the final validation metric
    (val, val_key)."""
    runs = [r for r in runs if r.info.status == "FINISHED" and moe_layer_names(r)]
    key = val_key(runs)
    rows = []
    for run in runs:
        layers = moe_layer_names(run)
        m, p = run.data.metrics, run.data.params
        curves = [metric_history(c, run.info.run_id, f"moe/{layer}/load_cv") for layer in layers]
        steps = curves[0][0]
        cv_mean = np.nanmean(np.stack([v for s, v in curves if len(s) == len(steps)]), axis=0)

        def mean_final(stat: str) -> float:
            values = [m[f"moe/{layer}/{stat}"] for layer in layers if f"moe/{layer}/{stat}" in m]
            return float(np.nanmean(values)) if values else math.nan

        router = run.data.tags.get("router", p.get("router.name", "?"))
        arm = arm_name(run)
        rows.append({
            "run_id": run.info.run_id, "label": f"{arm} {run.info.run_id[:6]}", "arm": arm, "name": run_label(run),
            "router": router, "data": run.data.tags.get("data", ""), "cv_steps": steps, "cv_mean": cv_mean,
            "final_cv": {layer: m.get(f"moe/{layer}/load_cv", math.nan) for layer in layers},
            "load_cv": mean_final("load_cv"), "max_over_mean_load": mean_final("max_over_mean_load"),
            "router_entropy": mean_final("router_entropy"), "load_entropy": mean_final("load_entropy"),
            "drop_rate": mean_final("drop_rate"), "no_expert_rate": mean_final("no_expert_rate"),
            "tokens_per_s": mean_metric(c, run, "train/tokens_per_s"),
            "tokens_total": m.get("train/tokens_total", math.nan),
            "params_total": int(p.get("params_total", 0)), "params_active": int(p.get("params_active", 0)),
            "val": m.get(key, math.nan), "val_key": key,
        })
    return rows


def latest_per_arm(runs: list[Run]) -> list[Run]:
    """The newest finished run of each arm (`arm_name`), in the order the arms first appear: running a
    comparison again replaces its rows instead of doubling them."""
    newest: dict[str, Run] = {}
    for run in sorted((r for r in runs if r.info.status == "FINISHED"), key=lambda r: r.info.start_time):
        newest[arm_name(run)] = run  # a dict keeps the position of its first insertion
    return list(newest.values())
