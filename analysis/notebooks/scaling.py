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
# # Scaling
#
# Final validation loss against training compute C and active parameters N, per model family (Mamba,
# BlackMamba, transformer, transformer-MoE), with fits of L = a * x^(-b) + c and the exponent b with its
# standard error. Settings from the environment:
#
# - `MLFLOW_TRACKING_URI`: the MLflow store (default `sqlite:///outputs/mlflow.db`)
# - `ANALYSIS_EXPERIMENT`: experiment or study name (default `blackmamba`)
# - `ANALYSIS_FIGURES`: where figures are written (default `outputs/analysis/notebooks/scaling`)

# %%
import os
from pathlib import Path

from analysis import plots, runs
from analysis.comparison import VAL_UNITS, val_key
from analysis.scaling import fit_families, scaling_points

client = runs.client()
experiment = os.environ.get("ANALYSIS_EXPERIMENT", "blackmamba")
figures = Path(os.environ.get("ANALYSIS_FIGURES", "outputs/analysis/notebooks/scaling"))
experiment_runs = runs.find_runs(experiment, client)
metric = val_key(experiment_runs)
points = scaling_points(experiment_runs, metric)
print(f"{len(points)} finished runs in {experiment}, loss = final {metric}")

# %% [markdown]
# ## Loss against training compute, per family

# %%
compute_fits = fit_families(points, "flops")
plots.save(plots.scaling_fits(compute_fits, f"{experiment}: loss vs compute", f"{metric} ({VAL_UNITS[metric]})"),
           figures / "scaling_flops.png")
for fam in compute_fits:
    print(f"{fam.group}: {fam.fit.describe() if fam.fit else ''} {fam.note}")

# %% [markdown]
# ## Loss against active parameters at a fixed token budget

# %%
size_fits = fit_families(points, "params_active")
plots.save(plots.scaling_fits(size_fits, f"{experiment}: loss vs active parameters", f"{metric} ({VAL_UNITS[metric]})"),
           figures / "scaling_params_active.png")
for fam in size_fits:
    print(f"{fam.group}: {fam.fit.describe() if fam.fit else ''} {fam.note}")
