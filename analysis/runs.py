"""Reading runs from MLflow: by run id, experiment name or Optuna study; metric histories; utilization snapshots.

The tracking URI is the one given, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db
(where `python run.py` writes by default).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.utilization import SNAPSHOT_DIR, load_snapshot

PARENT_TAG = "mlflow.parentRunId"
STUDY_TAGS = ("optuna.study", "optuna_study")  # sweeps/ tags runs with the first
UTILIZATION_STATS = ("load_cv", "max_over_mean_load", "load_entropy", "router_entropy", "drop_rate",
                     "aux_balance", "aux_z")


def tracking_uri(uri: str | None = None) -> str:
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('outputs/mlflow.db').resolve()}"


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient on tracking_uri(uri); a missing local SQLite file is an error, not a new empty store."""
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").partition("?")[0]).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri}: train a run first, or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    return MlflowClient(uri)


def _search(c: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    runs, token = [], None
    while True:
        page = c.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _without_parents(runs: list[Run]) -> list[Run]:
    """Drop the runs that are parents of others (a sweep's study run holds no training of its own)."""
    parents = {r.data.tags.get(PARENT_TAG) for r in runs}
    return [r for r in runs if r.info.run_id not in parents]


def find_runs(ref: str, c: MlflowClient) -> list[Run]:
    """The training runs `ref` names: a run id, an experiment name, or an Optuna study name (runs tagged
    optuna.study=<ref> or optuna_study=<ref>, and the children, through mlflow.parentRunId, of a run so named
    or tagged).
    Parent runs are left out. ValueError, listing the experiments, when nothing matches."""
    try:
        return [c.get_run(ref)]
    except MlflowException:
        pass
    experiment = c.get_experiment_by_name(ref)
    if experiment is not None:
        return _without_parents(_search(c, [experiment.experiment_id]))
    all_ids = [e.experiment_id for e in c.search_experiments()]
    study = [r for query in [f"tags.`{tag}` = '{ref}'" for tag in STUDY_TAGS] + [f"attributes.run_name = '{ref}'"]
             for r in _search(c, all_ids, query)]
    children = [child for parent in study for child in _search(c, all_ids, f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")]
    unique = {r.info.run_id: r for r in study + children}
    runs = _without_parents(list(unique.values()))
    if not runs:
        names = ", ".join(sorted(e.name for e in c.search_experiments())) or "none"
        raise ValueError(f"'{ref}' is no run id, experiment or study in {c.tracking_uri} (experiments: {names})")
    return runs


def latest_run(c: MlflowClient, experiment: str | None = None, moe_only: bool = True) -> Run:
    """The newest finished run (of `experiment`, else of any experiment), with MoE metrics if moe_only."""
    ids = [c.get_experiment_by_name(experiment).experiment_id] if experiment else [e.experiment_id for e in c.search_experiments()]
    runs = [r for r in c.search_runs(ids, "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
            if not moe_only or moe_layer_names(r)]
    if not runs:
        raise ValueError(f"no finished run{' with MoE layers' if moe_only else ''} in {c.tracking_uri}")
    return runs[0]


def run_label(run: Run) -> str:
    """The run's name and the start of its id (names alone can repeat)."""
    return f"{run.info.run_name or 'run'} {run.info.run_id[:6]}"


def moe_layer_names(run: Run) -> list[str]:
    """The MoE layers that logged utilization (moe/<layer>/...), in layer order."""
    names = {k.split("/")[1] for k in run.data.metrics if k.startswith("moe/")}
    return sorted(names, key=lambda n: (len(n), n))


def metric_history(c: MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metric, by step (the last value logged at a step wins)."""
    by_step = {m.step: m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def utilization_history(c: MlflowClient, run: Run) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """layer -> stat -> (steps, values) of the per-validation utilization metrics moe/<layer>/<stat>."""
    return {layer: {stat: metric_history(c, run.info.run_id, f"moe/{layer}/{stat}") for stat in UTILIZATION_STATS
                    if f"moe/{layer}/{stat}" in run.data.metrics}
            for layer in moe_layer_names(run)}


def run_dir(run: Run) -> Path | None:
    """<out_dir>/runs/<run id> on this machine (from the checkpoint_dir tag), if it exists here."""
    tag = run.data.tags.get("checkpoint_dir")
    return Path(tag).parent if tag and Path(tag).parent.is_dir() else None


def checkpoint_paths(run: Run) -> list[Path]:
    """The run's checkpoints on this machine: the train loop keeps last.ckpt, prev.ckpt (the one before it) and
    best.ckpt; *.corrupt files (set aside at resume) and *.tmp files are not checkpoints."""
    tag = run.data.tags.get("checkpoint_dir")
    return sorted(Path(tag).glob("*.ckpt")) if tag and Path(tag).is_dir() else []


def snapshot_files(c: MlflowClient, run: Run) -> list[Path]:
    """The run's utilization/step_*.npz files: from its run directory when on this machine, else downloaded
    from the MLflow artifact store into a temporary directory."""
    local = run_dir(run)
    if local is not None and (local / SNAPSHOT_DIR).is_dir():
        return sorted((local / SNAPSHOT_DIR).glob("step_*.npz"))
    if not c.list_artifacts(run.info.run_id, SNAPSHOT_DIR):
        return []
    dst = Path(tempfile.mkdtemp(prefix=f"utilization-{run.info.run_id[:8]}-"))
    return sorted(Path(c.download_artifacts(run.info.run_id, SNAPSHOT_DIR, str(dst))).glob("step_*.npz"))


def load_snapshots(c: MlflowClient, run: Run) -> list[dict[str, np.ndarray]]:
    """Every utilization snapshot of the run, by step (see experiments.utilization for the keys)."""
    return sorted((load_snapshot(p) for p in snapshot_files(c, run)), key=lambda s: int(s["step"]))


def layer_arrays(snapshot: dict[str, np.ndarray], layer: str) -> dict[str, np.ndarray]:
    """One layer's counters from a snapshot, without the '<layer>/' prefix (plus aux_names)."""
    prefix = f"{layer}/"
    out = {k[len(prefix):]: v for k, v in snapshot.items() if k.startswith(prefix)}
    out["aux_names"] = snapshot["aux_names"]
    return out


def total_counters(snapshots: list[dict[str, np.ndarray]], layer: str) -> dict[str, np.ndarray]:
    """A layer's counters summed over snapshots: the whole of training since the first one (val_* left out)."""
    keys = [k for k in layer_arrays(snapshots[0], layer) if not k.startswith("val_") and k != "aux_names"]
    out = {k: sum(layer_arrays(s, layer)[k] for s in snapshots) for k in keys}
    out["aux_names"] = snapshots[0]["aux_names"]
    return out


def load_matrix(snapshots: list[dict[str, np.ndarray]], layers: list[str], last_only: bool = False) -> np.ndarray:
    """(L, E) slots per expert per layer: summed over all snapshots, or of the last one only."""
    if last_only:
        return np.stack([layer_arrays(snapshots[-1], layer)["tokens_per_expert"] for layer in layers])
    return np.stack([total_counters(snapshots, layer)["tokens_per_expert"] for layer in layers])
