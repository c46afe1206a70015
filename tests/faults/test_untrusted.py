"""Untrusted files: a checkpoint, an analysis artifact or a config from elsewhere cannot run code here."""
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf.basecontainer import BaseContainer

from experiments.checkpoint import CheckpointError, load_checkpoint, write_checkpoint
from experiments.cli import main_generate, main_train
from experiments.config import compose
from experiments.train import train
from experiments.utilization import load_snapshot
from sweeps.cli import main as main_sweep

from ._util import ROOT, run_script


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_checkpoint(tmp_path):
    """A checkpoint that looks like ours (keys, a valid SHA-256 trailer) and carries a pickled payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    write_checkpoint({"state_dict": {}, "run_config": "", "global_step": 0, "payload": Payload(marker)}, path)
    return path, marker


def test_the_payload_is_live(evil_checkpoint):
    path, marker = evil_checkpoint
    child = multiprocessing.get_context("fork").Process(target=torch.load, args=(path,), kwargs={"weights_only": False})
    child.start()
    child.join()
    assert marker.exists(), "a plain unpickling load (here in a child process) runs it: the tests below would see it"


def test_a_malicious_checkpoint_is_refused_not_executed(evil_checkpoint, tiny, tmp_path, store, capsys):
    path, marker = evil_checkpoint
    store(tmp_path)
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} is refused: it holds pickled objects"):
        load_checkpoint(path)
    assert main_generate([f"ckpt={path}"]) == 2
    assert "unsupported GLOBAL posix.system" in capsys.readouterr().err
    # as the checkpoints of a downloaded run directory: resume refuses them too
    run = train(compose(tiny("trainer.stop_at_step=2")))
    for name in ("last.ckpt", "prev.ckpt"):
        shutil.copy(path, run.run_dir / "checkpoints" / name)
    assert main_train([f"out_dir={tmp_path}", f"resume={run.run_id}"]) == 2
    assert "no loadable checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_analysis_artifacts_load_without_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "step_000002.npz"
    np.savez(path, step=np.array(2), evil=np.array([Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_snapshot(path)
    assert not marker.exists()


YAML_PAYLOAD = "!!python/object/apply:os.system ['touch {marker}']"


def test_configs_cannot_import_or_call_code(tiny, tmp_path, store, capsys):
    store(tmp_path)
    marker = tmp_path / "pwned"
    sweep_file = tmp_path / "space.yaml"
    sweep_file.write_text(f"params: {YAML_PAYLOAD.format(marker=marker)}\n")
    assert main_sweep(tiny(f"sweep={sweep_file}")) == 2
    assert "is not a valid config file" in capsys.readouterr().err
    run = train(compose(tiny("trainer.stop_at_step=2")))  # a run directory from elsewhere, with a doctored config
    (run.run_dir / "config.yaml").write_text(f"seed: {YAML_PAYLOAD.format(marker=marker)}\n")
    assert main_train([f"out_dir={tmp_path}", f"resume={run.run_id}"]) == 2
    assert "config.yaml is not a valid config file" in capsys.readouterr().err
    assert not marker.exists()
    # no key names code to build (no _target_), and only OmegaConf's own resolvers exist
    assert main_train(tiny("_target_=os.system")) == 2
    assert "unknown config key '_target_'" in capsys.readouterr().err
    import analysis.report  # noqa: F401  (every package that could register one is imported)
    import sweeps.objective  # noqa: F401

    rc, builtin, _ = run_script("-c", ["from omegaconf.basecontainer import BaseContainer as B; print(*sorted(B._resolvers))"])
    assert rc == 0 and sorted(BaseContainer._resolvers) == builtin.split()


def test_documented_servers_bind_to_localhost():
    commands = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if re.match(r"\s*(mlflow (ui|server)|optuna-dashboard) ", line):
                commands.append((doc.name, line.strip()))
    assert {c.split()[0] for _, c in commands} >= {"mlflow", "optuna-dashboard"}
    for doc, command in commands:
        assert "--host 127.0.0.1" in command, f"{doc}: {command}"
