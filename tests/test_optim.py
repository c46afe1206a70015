"""AdamW's implementations (optim.impl) and the clipping that goes with them: fused and multi-tensor AdamW reach the
same weights; clipping by hand uses the whole gradient's norm, as torch's clip_grad_norm_ does; a fused AdamW
under a GradScaler is refused before any run."""
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from experiments.config import compose
from experiments.module import LMModule, adamw_fused
from experiments.train import train


class OptimizerFlags(Callback):
    """AdamW's fused flag per param group as the steps see it (read at every batch: the last one stays)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.fused = [g["fused"] for g in trainer.optimizers[0].param_groups]


def final_weights(out_dir, run_id) -> dict:
    ckpt = torch.load(out_dir / "runs" / run_id / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]


def test_fused_and_foreach_adamw_reach_the_same_weights(tiny, tmp_path):
    # a clip small enough to act at every step: both paths go through the module's own clipping
    weights, flags = {}, {}
    for impl in ("fused", "foreach"):
        probe = OptimizerFlags()
        result = train(compose(tiny(f"optim.impl={impl}", "trainer.grad_clip=0.05", "trainer.max_steps=4",
                                    "trainer.val_every=4")), callbacks=[probe])
        weights[impl], flags[impl] = final_weights(tmp_path, result.run_id), probe.fused
    assert flags == {"fused": [True, True], "foreach": [None, None]}
    assert weights["fused"].keys() == weights["foreach"].keys()
    for k, w in weights["fused"].items():
        torch.testing.assert_close(w, weights["foreach"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_resumed_run_takes_adamw_from_its_config_not_from_the_checkpoint(tiny, tmp_path):
    # the checkpoint's param groups carry the saving run's choice (foreach); the resumed run asks for fused
    steps = ("trainer.max_steps=6", "trainer.val_every=3")
    whole = train(compose(tiny(*steps, "optim.impl=fused", f"out_dir={tmp_path / 'a'}")))
    part = train(compose(tiny(*steps, "optim.impl=foreach", "trainer.stop_at_step=3", f"out_dir={tmp_path / 'b'}")))
    probe = OptimizerFlags()
    train(compose([f"out_dir={tmp_path / 'b'}", f"resume={part.run_id}", "optim.impl=fused"]), callbacks=[probe])
    assert probe.fused == [True, True]
    a, b = final_weights(tmp_path / "a", whole.run_id), final_weights(tmp_path / "b", part.run_id)
    for k, w in a.items():
        torch.testing.assert_close(w, b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_clipping_scales_by_the_whole_gradients_norm(tiny):
    module = LMModule(compose(tiny()), 256)
    torch.manual_seed(0)
    params = [p for p in module.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(twins, 0.1)  # torch's own clipping, on copies
    expected = [t.grad for t in twins]
    optimizer = torch.optim.AdamW(params)
    module._loss = torch.tensor(1.0)
    module.on_before_optimizer_step(optimizer)
    torch.testing.assert_close(module._grad_norm, norm)
    module.configure_gradient_clipping(optimizer, 0.1, "norm")
    got = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    torch.testing.assert_close(got, torch.tensor(0.1), rtol=1e-5, atol=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_auto_fuses_only_on_the_gpu_without_a_grad_scaler():
    cpu, gpu = [torch.zeros(2)], [SimpleNamespace(is_cuda=True)]
    assert adamw_fused("auto", gpu, "bf16-mixed") and adamw_fused("auto", gpu, "32-true")
    assert not adamw_fused("auto", gpu, "16-mixed"), "a GradScaler must unscale before clipping"
    assert not adamw_fused("auto", cpu, "bf16-mixed")
    assert adamw_fused("fused", cpu, "32-true") and not adamw_fused("foreach", gpu, "bf16-mixed")
    with pytest.raises(ValueError, match="optim.impl=fused cannot run with trainer.precision=16-mixed"):
        adamw_fused("fused", gpu, "16-mixed")


def test_impossible_optimizer_configs_fail_at_compose(tiny):
    with pytest.raises(ValueError, match="optim.impl=fused cannot run with trainer.precision=16-mixed"):
        compose(tiny("optim.impl=fused", "trainer.precision=16-mixed"))
    with pytest.raises(ValueError, match="optim.impl must be one of auto, fused, foreach, got 'adam'"):
        compose(tiny("optim.impl=adam"))
