# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Expert utilization of one run
#
# How the experts of each MoE layer were used during training: load per expert, balance and entropy over
# training, co-activation of experts, which tokens each expert takes, and router saturation.
# Everything is computed by the `analysis` package from what training logged to MLflow
# (see docs/analysis.md). Settings come from the environment:
#
# - `MLFLOW_TRACKING_URI`: the MLflow store (default `sqlite:///outputs/mlflow.db`)
# - `ANALYSIS_RUN`: the run id (default: the newest finished run with MoE layers)
# - `ANALYSIS_FIGURES`: where figures are written (default `outputs/analysis/notebooks/utilization`)

# %%
import os
from pathlib import Path

from analysis import plots, runs
from analysis.metrics import layer_summary, top_tokens_table
from analysis.saturation import checkpoint_saturation, snapshot_saturation

client = runs.client()
run = client.get_run(os.environ["ANALYSIS_RUN"]) if os.environ.get("ANALYSIS_RUN") else runs.latest_run(client)
figures = Path(os.environ.get("ANALYSIS_FIGURES", "outputs/analysis/notebooks/utilization"))
name = runs.run_label(run)
layers = runs.moe_layer_names(run)
snapshots = runs.load_snapshots(client, run)
last_step = int(snapshots[-1]["step"])
print(f"run {name}: router {run.data.params['router.name']}, {run.data.params['moe.num_experts']} experts, "
      f"top_k {run.data.params['moe.top_k']}; MoE layers {layers}; {len(snapshots)} utilization snapshots")

# %% [markdown]
# ## Load per expert, relative to a uniform load
# 1 (white) is a perfectly balanced expert; red experts are overloaded, blue ones starved.

# %%
plots.save(plots.load_heatmap(runs.load_matrix(snapshots, layers), layers,
                              f"{name}: expert load, training steps 0-{last_step}"), figures / "load_heatmap.png")

# %% [markdown]
# ## Load balance and entropy over training
# Logged at every validation, over the training steps since the previous one.

# %%
plots.save(plots.utilization_over_training(runs.utilization_history(client, run), f"{name}: expert utilization"),
           figures / "utilization_over_training.png")

# %% [markdown]
# The same statistics recomputed from the raw counters of the last snapshot:

# %%
for layer in layers:
    print(layer, {k: round(v, 4) for k, v in layer_summary(runs.layer_arrays(snapshots[-1], layer)).items()})

# %% [markdown]
# ## Expert co-activation
# P(expert j active | expert i active). With top-1 routing every token has one expert and the matrix is the identity.

# %%
coactivation = {layer: runs.total_counters(snapshots, layer)["coactivation"] for layer in layers}
plots.save(plots.coactivation_heatmaps(coactivation, f"{name}: expert co-activation"), figures / "coactivation.png")

# %% [markdown]
# ## Which tokens each expert takes
# Per expert: its share of all slots, then its most frequent tokens with their share of the expert's slots and
# p = P(expert | token), the fraction of that token's occurrences the expert processed.

# %%
for layer in layers:
    totals = runs.total_counters(snapshots, layer)
    print(layer)
    print(top_tokens_table(totals["token_expert"], 8, token_counts_V=totals["token_counts"]))

# %% [markdown]
# ## Router saturation
# Agreement of the routing of a fixed validation batch at each validation with the final routing (OLMoE).
# The checkpoint table routes the same batch through each checkpoint the run kept (last.ckpt, best.ckpt).

# %%
steps, agreement = snapshot_saturation(snapshots)
chance = int(run.data.params["moe.top_k"]) / int(run.data.params["moe.num_experts"])
plots.save(plots.saturation_curves(steps, agreement, f"{name}: router saturation", chance), figures / "saturation.png")
for ckpt, step, per_layer in checkpoint_saturation(runs.checkpoint_paths(run), snapshots[-1]["val_token_ids"]):
    print(ckpt, "step", step, {layer: f"{value:.1%}" for layer, value in per_layer.items()})
