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
# # Routers side by side
#
# Runs of one MLflow experiment (or Optuna study) that differ in their router, e.g.
#
#     for r in top1 sinkhorn expert_choice; do python run.py router=$r tracking.experiment=routers; done
#
# compared on load balance, router entropy and validation loss. Settings from the environment:
#
# - `MLFLOW_TRACKING_URI`: the MLflow store (default `sqlite:///outputs/mlflow.db`)
# - `ANALYSIS_EXPERIMENT`: experiment or study name (default `blackmamba`)
# - `ANALYSIS_FIGURES`: where figures are written (default `outputs/analysis/notebooks/router_comparison`)

# %%
import os
from pathlib import Path

from analysis import plots, runs
from analysis.comparison import router_rows

client = runs.client()
experiment = os.environ.get("ANALYSIS_EXPERIMENT", "blackmamba")
figures = Path(os.environ.get("ANALYSIS_FIGURES", "outputs/analysis/notebooks/router_comparison"))
rows = router_rows(client, runs.find_runs(experiment, client))
print(f"{len(rows)} MoE runs in {experiment}; data: {sorted({r['data'] for r in rows})}")

# %% [markdown]
# Load statistics describe the training-time routing: expert-choice fills every expert to capacity by
# construction (load CV 0), Sinkhorn balances within each batch, top-1 relies on its balancing loss.

# %%
plots.save(plots.router_comparison(rows, f"{experiment}: routers side by side"), figures / "router_comparison.png")

# %%
for r in rows:
    print(f"{r['label']:>24}  load CV {r['load_cv']:.3f}  router entropy {r['router_entropy']:.3f}  "
          f"load entropy {r['load_entropy']:.3f}  drop rate {r['drop_rate']:.3f}  {r['val_key']} {r['val']:.4f}")
