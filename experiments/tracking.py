"""MLflow tracking: a local SQLite store by default, $MLFLOW_TRACKING_URI (e.g. a server) when set.

Several processes may share one SQLite store (a sweep's workers, runs started side by side): each waits up
to SQLITE_TIMEOUT_S for another's write to finish instead of failing with "database is locked", and a new
store's tables are created by one process at a time (open_store).

Each run records the process that trains it (tags process.host, process.pid, process.start). A run that is
RUNNING although that process is gone (killed, or its machine rebooted) is closed as FAILED with the tag
end_reason when the run is resumed or listed (close_if_orphaned); a run whose process is alive cannot be
resumed a second time.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, processes must not create one store at once
    fcntl = None

SQLITE_TIMEOUT_S = 60


def tracking_uri(cfg: DictConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db (never the ./mlruns file store)."""
    if cfg.tracking.uri:
        return with_sqlite_timeout(cfg.tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return with_sqlite_timeout(os.environ["MLFLOW_TRACKING_URI"])
    db = Path(cfg.out_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return with_sqlite_timeout(f"sqlite:///{db}")


def with_sqlite_timeout(uri: str) -> str:
    """A sqlite:// URI with a lock wait of SQLITE_TIMEOUT_S (SQLite's own default is 5 s); others as given."""
    if not uri.startswith("sqlite:") or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_TIMEOUT_S}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) across processes of this machine; the system
    releases it when the holder dies, so a killed process leaves no stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def open_store(uri: str) -> MlflowClient:
    """An MlflowClient with its store opened. A new SQLite store is created (MLflow's schema migrations) under
    a lock beside it: processes that create one together would otherwise fail all but one."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    with file_lock(Path(uri.removeprefix("sqlite:///").split("?", 1)[0] + ".lock")):
        return MlflowClient(uri)  # MLflow opens (and creates) the store here


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
    open_store(uri)
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
              "family": model_family(cfg), **process_tags(), **(extra_tags or {})},
    )
    # mlflow.set_tracking_uri (called when the run starts) also sets $MLFLOW_TRACKING_URI; undo that so a
    # later run in this process (a sweep trial, a test) resolves its own store instead of inheriting ours
    before = os.environ.get("MLFLOW_TRACKING_URI")
    _ = logger.experiment
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if run_id:  # a resumed run is RUNNING again, in this process
        for key, value in process_tags().items():
            logger.experiment.set_tag(run_id, key, value)
        logger.experiment.update_run(run_id, "RUNNING")
    return logger


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Tags that name the process training a run."""
    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            "process.start": _process_start(os.getpid()) or ""}


def owner_alive(run: Run) -> bool | None:
    """Whether the process recorded on `run` is still running: None when it ran on another host."""
    tags = run.data.tags
    if tags.get("process.host") != socket.gethostname() or not tags.get("process.pid", "").isdigit():
        return None
    pid = int(tags["process.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, under another user
    start = _process_start(pid)
    return start is None or not tags.get("process.start") or start == tags["process.start"]


def close_if_orphaned(client: MlflowClient, run: Run) -> bool:
    """End a RUNNING run whose process is gone as FAILED (tag end_reason); True if it was closed."""
    if run.info.status != "RUNNING" or owner_alive(run) is not False:
        return False
    tags = run.data.tags
    reason = f"process {tags['process.pid']} on {tags['process.host']} ended without closing the run (killed or crashed)"
    client.set_tag(run.info.run_id, "end_reason", reason)
    client.set_terminated(run.info.run_id, "FAILED")
    return True


def list_runs(cfg: DictConfig, limit: int = 50) -> str:
    """The newest runs of cfg.tracking.experiment, one line each; runs left RUNNING by a process that is gone
    are closed first (close_if_orphaned), so the list shows what is really running."""
    from datetime import datetime

    client = open_store(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return f"no experiment '{cfg.tracking.experiment}' in {tracking_uri(cfg)}"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    lines = [f"{'run id':<32}  {'status':<8}  {'started':<16}  name"]
    for run in runs:
        closed = close_if_orphaned(client, run)
        status = "FAILED" if closed else run.info.status
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        note = "  (was RUNNING: its process is gone)" if closed else ""
        lines.append(f"{run.info.run_id:<32}  {status:<8}  {started:<16}  {run.info.run_name}{note}")
    return "\n".join(lines)
