"""Concurrency: 4 sweep worker processes share one SQLite Optuna storage and one SQLite MLflow store; 20 tiny
trials are each recorded once, and both stores stay consistent (no "database is locked"). Processes that
create one new MLflow store at the same time all get it."""
import multiprocessing
import sqlite3

import optuna

from experiments.tracking import open_store, with_sqlite_timeout

from ._util import client_for, run_script


def _open(uri: str, results) -> None:
    try:
        results.put(len(open_store(uri).search_experiments()))
    except Exception as e:  # noqa: BLE001  (reported to the test)
        results.put(f"{type(e).__name__}: {e}")


def test_processes_that_create_one_store_together_all_get_it(tmp_path):
    uri = with_sqlite_timeout(f"sqlite:///{tmp_path / 'mlflow.db'}")  # as run.py and sweep.py open it
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    children = [fork.Process(target=_open, args=(uri, results)) for _ in range(3)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=300) for _ in children]
    for child in children:
        child.join()
    assert outcomes == [1, 1, 1], "each sees the store with its Default experiment, none failed creating it"


def test_four_workers_record_twenty_trials_once_each(tiny, tmp_path, store):
    store(tmp_path)
    argv = tiny("sweep=lr", "n_trials=20", "n_jobs=4", "sampler=random", "pruner=none", "trainer.max_steps=2",
                "budget.reports=1")
    rc, out, err = run_script("sweep.py", argv, timeout=600)
    assert rc == 0, err
    assert "database is locked" not in out + err
    for log in (tmp_path / "sweeps" / "lr" / "logs").glob("trial-*.log"):
        assert "database is locked" not in log.read_text(), log.name

    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.number for t in study.trials) == list(range(20))
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 4, "all four processes ran trials"

    client = client_for(tmp_path)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 21 and len(children) == 20, "one parent and one run per trial, no duplicate"
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(20))
    for run in children:
        trial = study.trials[int(run.data.tags["optuna.trial"])]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.metrics["val/bpb"] == trial.value, "each store says the same about the trial"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    for db in ("optuna.db", "mlflow.db"):
        with sqlite3.connect(tmp_path / db) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",), db
