"""One rank of a multi-process test (tests/test_distributed.py starts W of these, as torchrun would: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment; gloo on the CPU). Each case compares the distributed
computation with the single-process one computed in the same process, or writes what the test compares.

    python tests/distributed_worker.py CASE OUT_DIR [ARGS...]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from blocks.expert_parallel import expert_groups, gather_experts, shard_experts, sync_expert_grads  # noqa: E402
from blocks.moe import MoE, MoEConfig  # noqa: E402
from routers import build_router, count_per_expert  # noqa: E402
from routers.sinkhorn import sinkhorn_log_plan  # noqa: E402

D, T_PER_RANK = 8, 12


def _moe(num_experts: int, top_k: int, router: str) -> MoE:
    torch.manual_seed(0)  # the same full layer on every rank
    moe = MoE(D, MoEConfig(num_experts=num_experts, top_k=top_k, router=router, router_cfg={"z_loss_coef": 0.0}),
              ffn_dim=16)
    with torch.no_grad():
        moe.gate.bias[-1] = -30.0  # the last expert gets no token: a zero count in the all-to-all
        moe.gate.bias[0] = 1.0  # and the first more than its share: uneven counts
    return moe


def case_ep(out: Path, ep_size: int, top_k: int) -> None:
    """Expert-parallel MoE layer == the single-process layer: outputs, input and weight gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    E = 2 * world
    torch.manual_seed(1)
    x_all = torch.randn(world * T_PER_RANK, D)
    g_all = torch.randn(world * T_PER_RANK, D)  # loss = sum(y * g): every output element gets a gradient

    ref = _moe(E, top_k, "topk")
    ref.train()
    x_ref = x_all.clone().requires_grad_()
    y_ref, _ = ref(x_ref[None])
    (y_ref[0] * g_all).sum().backward()

    moe = _moe(E, top_k, "topk")
    moe.train()
    groups = expert_groups(ep_size)
    shard_experts(moe, groups)
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    x = x_all[rows].clone().requires_grad_()
    y, _ = moe(x[None])
    (y[0] * g_all[rows]).sum().backward()
    # replicated weights: each rank's gradient is its own tokens' share; their sum is the single-process one
    for p in (moe.gate.weight, moe.gate.bias):
        dist.all_reduce(p.grad)
    grad_in = moe.w_in.grad.clone()
    sync_expert_grads(moe, groups)  # sum over the replica group, / world: x world gives the sum-loss gradient
    expert_grad = gather_experts(moe.w_in.grad * world, groups)
    lo, hi = moe.expert_range
    counts = torch.zeros(E, dtype=torch.int64).scatter_add_(
        0, moe.router(moe.gate(x_all)).expert_ids_TK.reshape(-1), torch.ones(world * T_PER_RANK * top_k, dtype=torch.int64))
    torch.save({
        "y": (y[0] - y_ref[0, rows]).abs().max().item(),
        "x_grad": (x.grad - x_ref.grad[rows]).abs().max().item(),
        "w_in_grad_local": (grad_in - ref.w_in.grad[lo:hi]).abs().max().item() if ep_size == world else 0.0,
        "w_in_grad": (expert_grad - ref.w_in.grad).abs().max().item(),
        "w_out": (gather_experts(moe.w_out.detach(), groups) - ref.w_out).abs().max().item(),
        "gate_grad": (moe.gate.weight.grad - ref.gate.weight.grad).abs().max().item(),
        "scale": ref.w_in.grad.abs().max().item(),
        "counts": counts.tolist(),
    }, out / f"rank{rank}.pt")


def case_balance(out: Path) -> None:
    """Sinkhorn with balance_scope=global_batch and the global-batch balance loss over ranks == one process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    E = 4
    torch.manual_seed(2)
    logits_all = torch.randn(world * T_PER_RANK, E) * 2
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    plan_ref = sinkhorn_log_plan(logits_all, 0.5, 8)
    plan = sinkhorn_log_plan(logits_all[rows], 0.5, 8, all_ranks=True)
    router = build_router("sinkhorn", E, 1, {"balance_scope": "global_batch"}).train()
    ids = router(logits_all[rows]).expert_ids_TK
    ids_ref = torch.topk(plan_ref, 1, dim=-1).indices[rows]
    plan_local = sinkhorn_log_plan(logits_all[rows], 0.5, 8)  # one rank's plan alone: must differ

    cfg = {"balance_scope": "global_batch", "aux_loss_coef": 1.0, "z_loss_coef": 0.0}
    # the reference sees every token in one forward (its end_step all-reduces too: it runs on every rank, so
    # its counts are doubled, which leaves its frequencies, and so its loss, as they are)
    ref = build_router("topk", E, 1, cfg).train()
    ref(logits_all)
    ref.end_step()
    probs_ref = ref(logits_all)
    counts_ref = count_per_expert(torch.topk(logits_all, 1, dim=-1).indices, E)
    mine = build_router("topk", E, 1, cfg).train()
    mine(logits_all[rows])
    mine.end_step()  # all_reduce of this step's counts
    routed = mine(logits_all[rows])
    loss = routed.aux_losses["balance"].detach().clone()
    dist.all_reduce(loss)  # equal micro-batches: the mean of the ranks' losses is the global-batch loss
    torch.save({
        "plan": (plan - plan_ref[rows]).abs().max().item(),
        "plan_local": (plan_local - plan_ref[rows]).abs().max().item(),
        "ids_equal": bool(torch.equal(ids, ids_ref)),
        "counts": mine.load.last_counts.tolist(),
        "counts_ref": counts_ref.tolist(),
        "loss": (loss / world).item(),
        "loss_ref": probs_ref.aux_losses["balance"].item(),
    }, out / f"rank{rank}.pt")


def case_fsdp(out: Path) -> None:
    """The LM sharded per block with torch's fully_shard (FSDP2, which runs on CPU tensors with gloo, unlike the
    FSDP that Lightning's FSDPStrategy wraps): loss, gradients and one AdamW step equal one process's."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from experiments.build import build_model
    from experiments.config import compose
    from experiments.distributed import FSDP_UNITS

    rank, world = dist.get_rank(), dist.get_world_size()
    w = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)

    def make(scope):
        torch.manual_seed(0)
        return build_model(compose(["model=tiny", f"router.balance_scope={scope}"]), 256).train()

    def step(model, x, y):
        logits, aux = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + sum(aux.values())
        loss.backward()
        return loss.detach()

    ref = make("micro_batch")  # one process on the whole batch: its own tokens are all the tokens
    ref_loss = step(ref, w[:, :-1], w[:, 1:])
    model = make("global_batch")  # each rank's Sinkhorn plan over every rank's tokens
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        assert isinstance(block, FSDP_UNITS)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = step(model, w[rows, :-1], w[rows, 1:]).reshape(1)
    dist.all_reduce(loss)
    grad_err = max((p.grad.full_tensor() - q.grad).abs().max().item()
                   for p, q in zip(model.parameters(), ref.parameters()))
    for m in (ref, model):
        torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    weight_err = max((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    sharded = all(p.to_local().numel() < p.numel() for p in model.parameters() if p.numel() >= world)
    torch.save({"loss": (loss.item() / world, ref_loss.item()), "grad_err": grad_err, "weight_err": weight_err,
                "sharded": sharded}, out / f"rank{rank}.pt")


def main() -> None:
    case, out, *args = sys.argv[1:]
    if os.environ.get("DIST_TEST_STACKS_AFTER_S"):  # a rank stuck in a collective shows where, then exits
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["DIST_TEST_STACKS_AFTER_S"]), exit=True)
    # Lightning sets up torch.distributed itself in these two. Initialising it here first and again on the same
    # port is avoided: it is the likely cause of rare hangs seen when the whole test file ran.
    if case == "cli":  # run.py itself
        from experiments.cli import main_train

        rc = main_train(args)
        torch.save({"rc": rc}, Path(out) / f"rank{os.environ['RANK']}.pt")
        return
    if case == "lightning":
        from distributed_lightning import run  # tests/ is on sys.path as the script's folder

        run(Path(out), *args)
        return
    dist.init_process_group("gloo")
    try:
        if case == "ep":
            case_ep(Path(out), int(args[0]), int(args[1]))
        elif case == "balance":
            case_balance(Path(out))
        elif case == "fsdp":
            case_fsdp(Path(out))
        else:
            raise SystemExit(f"unknown case {case}")
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
