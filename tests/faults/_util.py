"""Helpers of the fault tests: real processes of run.py / sweep.py, their checkpoints and MLflow stores."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def client_for(out_dir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}")


def only_run(out_dir):
    client = client_for(out_dir)
    (run,) = client.search_runs([client.get_experiment_by_name("blackmamba").experiment_id])
    return run


def start(script: str, argv: list[str], **kwargs) -> subprocess.Popen:
    """`python <script> argv...` in the repository root, with its output captured."""
    argv = [a if isinstance(a, bytes) else str(a) for a in argv]  # bytes: an argument that is not UTF-8
    return subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_script(script: str, argv: list[str], timeout: float = 300, **kwargs) -> tuple[int, str, str]:
    return finish(start(script, argv, **kwargs), timeout)


def wait_for_file(proc: subprocess.Popen, pattern: str, folder: Path, timeout: float = 300) -> Path:
    """Poll `folder` for a file matching `pattern` while `proc` runs; fail with its output if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {pattern} appeared:\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {pattern} under {folder} after {timeout} s")


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
