"""Numerics: a non-finite loss or gradient is detected and its update skipped; N in a row stop the run with a
checkpoint and a message; the policy is a config key and each skip is logged; router logits carry a z-loss."""
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from experiments.build import build_model
from experiments.checkpoint import load_checkpoint
from experiments.cli import main_train
from experiments.config import choices, compose
from experiments.train import train

from ._util import client_for, state_dict


class InfGradient(Callback):
    """Puts an inf into one gradient after the backward pass of the given steps (as a bf16 overflow would),
    and keeps a copy of the weights before and after every step."""

    def __init__(self, steps):
        self.steps, self.before, self.after, self.adam_steps = set(steps), {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.after[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        state = trainer.optimizers[0].state
        self.adam_steps[step] = max((float(s["step"]) for s in state.values() if "step" in s), default=0.0)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_nonfinite_gradient_skips_its_update_and_is_logged(tiny, tmp_path, store, capsys):
    store(tmp_path)
    probe = InfGradient(steps=[2])
    result = train(compose(tiny("trainer.max_steps=5", "trainer.val_every=5", "trainer.log_every=1")), callbacks=[probe])
    assert same(probe.before[2], probe.after[2]), "the bad step changed no weight"
    assert not same(probe.before[1], probe.after[1]) and not same(probe.before[3], probe.after[3])
    assert probe.adam_steps[2] == probe.adam_steps[1], "AdamW's moments and step count were left alone"
    assert "step 2: non-finite gradient (norm inf): update skipped (1 in a row; 3 stop the run" in capsys.readouterr().out
    run = client_for(tmp_path).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/nonfinite_steps"] == 1
    assert run.data.params["trainer.nonfinite_stop_after"] == "3", "the policy is logged with the run"
    assert math.isfinite(run.data.metrics["train/aux_z"]), "the router's z-loss is trained and logged"


def test_nonfinite_steps_in_a_row_stop_the_run_with_the_weights_before_them(tiny, tmp_path, store):
    store(tmp_path)
    probe = InfGradient(steps=range(2, 100))
    with pytest.raises(FloatingPointError) as e:
        train(compose(tiny("trainer.max_steps=20", "trainer.val_every=10", "trainer.nonfinite_stop_after=4")),
              callbacks=[probe])
    message = str(e.value)
    assert message.startswith("non-finite loss or gradients at 4 steps in a row (steps 2-5, trainer.nonfinite_stop_after=4)")
    assert "last.ckpt" in message
    (run,) = client_for(tmp_path).search_runs([client_for(tmp_path).get_experiment_by_name("blackmamba").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["end_reason"] == message
    ckpt = load_checkpoint(tmp_path / "runs" / run.info.run_id / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    weights = {k.removeprefix("model."): v for k, v in state_dict(tmp_path / "runs" / run.info.run_id / "checkpoints" / "last.ckpt").items()}
    before = {k.removeprefix("model."): v for k, v in probe.before[2].items()}
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert same(weights, before), "the checkpoint holds the weights from before the first bad step"


def test_a_diverging_run_stops_with_one_line_and_exit_code_1(tiny, tmp_path, store, capsys):
    store(tmp_path)
    argv = tiny("optim.lr=1e30", "optim.warmup_steps=1", "trainer.grad_clip=0", "trainer.max_steps=8")
    assert main_train(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite loss or gradients at 3 steps in a row") and err.count("\n") == 1


@pytest.mark.parametrize("router", choices("router"))
def test_every_router_trains_with_a_z_loss_on_its_logits(tiny, router):
    cfg = compose(tiny(f"router={router}"))
    assert cfg.router.z_loss_coef > 0, "on by default (conf/config.yaml)"
    model = build_model(cfg, 256).train()
    _, aux = model(torch.randint(0, 256, (2, 16)))
    assert "z" in aux and torch.isfinite(aux["z"]) and aux["z"] > 0
