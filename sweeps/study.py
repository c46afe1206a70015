"""Where a study lives (its Optuna storage) and its MLflow parent run.

storage=                                     what it is
  (default) sqlite:///<out_dir>/optuna.db    one file; several processes on this machine share it (60 s lock wait)
  journal:<path>                             an append-only journal file (Optuna's JournalFileBackend)
  postgresql://user:pass@host/db, mysql://.. any SQLAlchemy URL: many machines, one study
RDB storages (SQLite included) run a heartbeat: a trial whose process died is marked failed by the next trial.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from experiments.config import ConfigError
from experiments.tracking import file_lock, tracking_uri
from sweeps import budget as budgets
from sweeps.spec import SweepSpec

HEARTBEAT_S = 60
ATTRS = ("sweep", "objectives", "budget")  # a resumed study must keep these, or its trials stop comparing


def default_storage(cfg: DictConfig) -> str:
    db = Path(cfg.out_dir).resolve() / "optuna.db"
    return f"sqlite:///{db}"


def redact(url: str) -> str:
    """The URL with any password masked, for logs and MLflow params."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url


@contextlib.contextmanager
def setup_lock(out_dir: str) -> Iterator[None]:
    """Processes started together on one machine create the SQLite stores under out_dir and the study's
    parent run one at a time (creating the tables at once fails; two parents would split the trials)."""
    with file_lock(Path(out_dir).resolve() / "sweep-setup.lock"):
        yield


def open_storage(url: str, tracking: str) -> BaseStorage:
    """An Optuna storage for `url` (see the module docstring); errors become one-line ConfigErrors.
    When the heartbeat finds a trial whose process died, its MLflow run (in store `tracking`) ends FAILED too."""

    def stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if parent:
            reason = f"no heartbeat for {3 * HEARTBEAT_S} s: the trial's process died"
            end_trial_run(MlflowClient(tracking), parent, study.study_name, trial.number, "FAILED", "FAIL", reason)

    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):].removeprefix("//"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:"):
            Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"connect_args": {"timeout": 60}}
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                          grace_period=3 * HEARTBEAT_S, heartbeat_stale_trial_callback=stale)
    except Exception as e:  # SQLAlchemy's URL, driver and connection errors, a missing driver package
        raise ConfigError(f"cannot open storage {redact(url)}: {str(e).splitlines()[0]}") from None


def open_study(storage: BaseStorage, name: str, spec: SweepSpec, budget: dict[str, Any],
               sampler: BaseSampler, pruner: BasePruner) -> optuna.Study:
    """Create the study, or load it (a re-run adds trials) after checking it was made with the same
    sweep, objectives and budget."""
    attrs = {"sweep": spec.name, "objectives": spec.objectives, "budget": budget}
    created = {**attrs, "budget_rule": budgets.describe(budget), "directions": spec.directions}
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=name,
                                    directions=spec.directions, load_if_exists=True)
        for key, value in created.items():
            study.set_user_attr(key, value)
    for key in ATTRS:
        stored = study.user_attrs.get(key)
        if stored != attrs[key]:
            raise ConfigError(f"study '{name}' was made with {key} {stored}, this command asks for {attrs[key]}; "
                              "use another study=<name>, or the same settings")
    return study


def mlflow_experiment(client: MlflowClient, cfg: DictConfig) -> str:
    """The id of cfg.tracking.experiment, created with the artifact location that run.py's logger uses."""
    name = cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = tracking_uri(cfg).startswith("sqlite:")
    artifacts = (Path(cfg.out_dir).resolve() / "mlartifacts").as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def parent_run(study: optuna.Study, client: MlflowClient, experiment_id: str, params: dict[str, str]) -> str:
    """The study's MLflow parent run: the one its user attrs name, else a new one recorded there."""
    known = study.user_attrs.get("mlflow_parent_run_id")
    if known:
        try:
            if client.get_run(known).info.lifecycle_stage == "active":
                return known
        except MlflowException:
            pass  # recorded in another tracking store: start one here
    run = client.create_run(experiment_id, run_name=study.study_name,
                            tags={"optuna.study": study.study_name, "sweep": params["sweep"]})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value[:6000])
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    # two machines starting at once may both get here (setup_lock serializes one machine's processes):
    # the id stored last wins, the other run is removed
    winner = study.user_attrs["mlflow_parent_run_id"]
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
    return winner


def end_trial_run(client: MlflowClient, parent_run_id: str, study_name: str, number: int, status: str, state: str,
                  reason: str | None) -> str:
    """Give trial `number`'s MLflow run its final status and tags, and return its id; a trial that failed
    before training started gets a run here, so that every trial shows up under the parent."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`optuna.trial` = '{number}'"))
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": parent_run_id, "optuna.trial": str(number), "optuna.study": study_name}).info.run_id
    client.set_tag(run_id, "optuna.state", state)
    if reason:
        client.set_tag(run_id, "optuna.fail_reason" if state == "FAIL" else "optuna.prune_reason", reason[:5000])
    client.set_terminated(run_id, status)
    return run_id
