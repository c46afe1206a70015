"""Fixtures of the fault tests."""
import shutil
from pathlib import Path

import pytest

from experiments.config import compose
from experiments.tracking import open_store
from experiments.train import RunResult, train


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    open_store(f"sqlite:///{db}")
    return db


@pytest.fixture(scope="session")
def store(_empty_store):
    """store(out_dir): give out_dir a new MLflow store, a copy of an empty one made once (MLflow's schema
    migrations take seconds for every new store); returns out_dir."""

    def seed(out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(_empty_store, out / "mlflow.db")
        return out

    return seed


@pytest.fixture(scope="session")
def reference(tmp_path_factory, store):
    """reference(tiny, *extra): the uninterrupted run of tiny(*extra) that a faulted run must match, trained
    once per session for each argv."""
    runs: dict[tuple[str, ...], RunResult] = {}

    def get(tiny, *extra: str) -> RunResult:
        if extra not in runs:
            out = store(tmp_path_factory.mktemp("reference"))
            runs[extra] = train(compose([*tiny(*extra), f"out_dir={out}"]))
        return runs[extra]

    return get
