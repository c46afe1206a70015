"""MLflow tracking: a local SQLite store by default, $MLFLOW_TRACKING_URI (e.g. a server) when set."""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig


def tracking_uri(cfg: DictConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db (never the ./mlruns file store)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(cfg.out_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def git_commit() -> str:
    """The commit of the code being run (with '-dirty' if it has uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


FAMILIES = {("mamba", "moe"): "blackmamba", ("mamba", "mlp"): "mamba", ("attention", "mlp"): "transformer",
            ("attention", "moe"): "transformer_moe"}


def model_family(cfg: DictConfig) -> str:
    """blackmamba, mamba, transformer, transformer_moe (as scaling plots group runs), or '<mixer>_<mlp>'."""
    mlp = cfg.model.mlp if cfg.model.pattern is None else ("moe" if "moe" in cfg.model.pattern else "mlp")
    return FAMILIES.get((cfg.mixer.name, mlp), f"{cfg.mixer.name}_{mlp}")


def make_logger(cfg: DictConfig, run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> MLFlowLogger:
    """An MLflow logger for a new run, or for continuing `run_id`. Artifacts go beside the SQLite store."""
    uri = tracking_uri(cfg)
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(cfg.out_dir).resolve() / "mlartifacts").as_uri()
    # MLflow's own random names come from Python's `random`, which the run has seeded: every run would get the
    # same one. Name runs by family plus a few random characters from the OS instead.
    run_name = cfg.tracking.run_name or f"{model_family(cfg)}-{uuid.uuid4().hex[:6]}"
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=None if run_id else run_name,
        tracking_uri=uri,
        artifact_location=artifacts,
        run_id=run_id,
        tags={"git_commit": git_commit(), "mixer": cfg.mixer.name, "router": cfg.router.name,
              "family": model_family(cfg), **(extra_tags or {})},
    )
    # mlflow.set_tracking_uri (called when the run starts) also sets $MLFLOW_TRACKING_URI; undo that so a
    # later run in this process (a sweep trial, a test) resolves its own store instead of inheriting ours
    before = os.environ.get("MLFLOW_TRACKING_URI")
    _ = logger.experiment
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return logger
