"""Several processes on the CPU (gloo), started as torchrun starts them: tests/distributed_worker.py per rank.

(a) DDP and (b) FSDP through the platform's Lightning strategies give the loss, gradients and weights of one
process on the same global batch; (c) the expert-parallel MoE gives the single-process layer's outputs and
gradients, with uneven expert loads and an expert that gets no token; (d) Sinkhorn's global column sums and
the global-batch balance loss are the single-process values on every rank.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, case: str, *args: str) -> list[dict]:
    """Run `case` on `world` ranks (the environment torchrun gives them) and return each rank's results."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   GROUP_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), TORCHELASTIC_RUN_ID="test",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), case, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("world, ep, top_k", [(2, 2, 1), (2, 2, 2), pytest.param(4, 2, 2, marks=pytest.mark.slow)])
def test_expert_parallel_moe_matches_the_single_process_layer(tmp_path, world, ep, top_k):
    results = launch(world, tmp_path, "ep", str(ep), str(top_k))
    counts = results[0]["counts"]
    assert counts[-1] == 0 and counts[0] > max(counts[1:-1]), counts  # an idle expert, and uneven loads
    for r in results:
        tol = 1e-5 * max(1.0, r["scale"])
        for key in ("y", "x_grad", "w_in_grad_local", "w_in_grad", "w_out", "gate_grad"):
            assert r[key] < tol, (key, r)


def test_global_sinkhorn_and_balance_loss_equal_the_single_process_values(tmp_path):
    for r in launch(2, tmp_path, "balance"):
        assert r["plan"] < 1e-5 and r["ids_equal"], r
        assert r["plan_local"] > 1e-3, r  # one rank's own plan is different: the test can tell
        assert r["counts"] == r["counts_ref"], r
        assert abs(r["loss"] - r["loss_ref"]) < 1e-6, r
