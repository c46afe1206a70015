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

import numpy as np
import pytest
import torch

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIMEOUT_S = 300  # generous: the CPU may be shared; a hung rank prints its stack after STACKS_AFTER_S
STACKS_AFTER_S = 150


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
                   OMP_NUM_THREADS="1", DIST_TEST_STACKS_AFTER_S=str(STACKS_AFTER_S))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), case, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("\n".join(f"rank {rank} exited with {p.returncode}:\n{log[-3000:]}"
                                        for rank, (p, log) in enumerate(zip(procs, logs))))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world) if (out / f"rank{r}.pt").exists()]


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


def _lightning_reference(tmp_path: Path) -> tuple[dict, dict]:
    from experiments.checkpoint import load_checkpoint

    ref = launch(1, tmp_path / "ref", "lightning", "auto")[0]
    return ref, load_checkpoint(tmp_path / "ref" / "final.ckpt")


def _compare_lightning(tmp_path: Path, world: int, strategy: str, ep: int = 1) -> None:
    from experiments.checkpoint import load_checkpoint

    ref, ref_ckpt = _lightning_reference(tmp_path)
    got = launch(world, tmp_path / strategy, "lightning", strategy, str(ep))[0]
    assert got["world"] == world
    for step, (mine, theirs) in enumerate(zip(got["losses"], ref["losses"])):
        assert len(mine) == world and abs(sum(mine) / world - theirs[0]) < 1e-5, (step, mine, theirs)
    for step, (mine, theirs) in enumerate(zip(got["grads"], ref["grads"])):
        assert mine.keys() == theirs.keys()
        for name, g in theirs.items():
            assert torch.allclose(mine[name], g, atol=1e-6, rtol=1e-4), (step, name, (mine[name] - g).abs().max())
    state, ref_state = load_checkpoint(tmp_path / strategy / "final.ckpt")["state_dict"], ref_ckpt["state_dict"]
    assert state.keys() == ref_state.keys()
    for name, w in ref_state.items():
        assert state[name].shape == w.shape, name  # whole experts in the checkpoint, whatever the sharding
        assert torch.allclose(state[name], w, atol=2e-5), (name, (state[name] - w).abs().max())


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_on_the_same_global_batch(tmp_path):
    _compare_lightning(tmp_path, 2, "ddp")


@pytest.mark.slow
def test_master_weights_under_ddp_match_one_process(tmp_path):
    """optim.master_weights=true: DDP wraps bf16 weights (cast before it builds its buckets), reduces bf16
    gradients, and every rank's fp32 masters end where one process's do, to bf16 rounding of the gradients."""
    mw = ("optim.master_weights=true", "trainer.precision=bf16-mixed")
    ref = launch(1, tmp_path / "ref", "lightning", "auto", "1", *mw)[0]
    got = launch(2, tmp_path / "ddp", "lightning", "ddp", "1", *mw)[0]
    assert ref["param_dtypes"] == got["param_dtypes"] == ["torch.bfloat16"]
    assert ref["masters"].keys() == got["masters"].keys() and ref["masters"]
    for step, (mine, theirs) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(sum(mine) / 2 - theirs[0]) < 1e-2 * abs(theirs[0]), (step, mine, theirs)
    for name, m in ref["masters"].items():
        assert m.dtype == torch.float32
        # AdamW's first steps move each weight by about lr (2e-3) whatever the gradient's size, so where a
        # gradient is near zero, its bf16 rounding can flip the step's sign: almost every weight agrees far
        # closer than lr, and none differs by more than the two steps
        diff = (got["masters"][name] - m).abs()
        assert (diff < 2e-4).float().mean() > 0.98 and diff.max() <= 2 * 2e-3 + 1e-6, (name, diff.max())


@pytest.mark.slow
def test_expert_parallel_under_ddp_matches_one_process(tmp_path):
    _compare_lightning(tmp_path, 2, "ddp", ep=2)


def test_fsdp_sharding_per_block_matches_one_process_on_the_same_global_batch(tmp_path):
    """torch's fully_shard per block (the FSDP units of trainer.strategy=fsdp) on gloo: Lightning's FSDPStrategy
    itself needs CUDA (torch's FSDP refuses CPU-only processes), so this checks the model under FSDP sharding."""
    for r in launch(2, tmp_path, "fsdp"):
        assert r["sharded"], r
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, r
        assert r["grad_err"] < 1e-6 and r["weight_err"] < 5e-5, r  # AdamW (lr 1e-2) magnifies rounding


@pytest.mark.slow
def test_run_py_under_torchrun_with_expert_parallelism_makes_one_run(tmp_path, tiny):
    """rank 0 alone opens the MLflow run and writes; checkpoints written mid-run and at the end hold whole
    experts (and training goes on after a mid-run one); resume=last continues the same run on 2 ranks."""
    import mlflow

    from experiments.checkpoint import load_checkpoint

    argv = tiny("data.batch_size=2", "trainer.accelerator=cpu", "trainer.devices=2", "moe.expert_parallel=2",
                "router.balance_scope=global_batch")
    assert [r["rc"] for r in launch(2, tmp_path / "a", "cli", *argv)] == [0, 0]
    assert [r["rc"] for r in launch(2, tmp_path / "b", "cli", "resume=last", "trainer.max_steps=6",
                                    f"out_dir={tmp_path}")] == [0, 0]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("blackmamba").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in found] == [(runs[0].name, "FINISHED")]
    ckpt = load_checkpoint(runs[0] / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    experts = [v for k, v in ckpt["state_dict"].items() if k.endswith("mlp.w_in")]
    assert experts and all(v.shape[0] == 4 for v in experts)  # model=tiny: 4 experts, 2 on each rank
    # the utilization logged at step 2 counts both ranks' tokens: 2 steps x 2 ranks x 2 sequences x 32 tokens
    snapshot = np.load(runs[0] / "utilization" / "step_000002.npz")
    for layer in snapshot["layers"]:
        assert snapshot[f"{layer}/num_tokens"] == 256 and snapshot[f"{layer}/tokens_per_expert"].sum() == 256
