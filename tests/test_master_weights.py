"""optim.master_weights: bf16 weights with AdamW on fp32 masters (experiments/master_adamw.py). The update is
fp32 AdamW's exactly, the weights are its rounding, the fp32 state survives a checkpoint, a resumed run ends
where an uninterrupted one does, and the configs it cannot run with fail before any run."""
import copy

import pytest
import torch

from experiments.cli import main_train
from experiments.config import compose
from experiments.generation import generate, load_model
from experiments.master_adamw import MasterAdamW
from experiments.train import train

MW = ("optim.master_weights=true", "trainer.precision=bf16-mixed")


def _pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 9), (9,), (3, 4, 5)]
    fp32 = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    return fp32, [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in fp32]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_the_masters_follow_fp32_adamw_and_the_weights_are_their_rounding(impl):
    flags = {"foreach": True} if impl == "foreach" else {"fused": True}
    ref, low = _pair(0)
    kw = dict(lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, **flags)
    ref_opt = torch.optim.AdamW(ref, **kw)
    opt = MasterAdamW(low, masters=dict(zip(low, ref)), **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in ref]
        for p, q, gr in zip(ref, low, grads):
            p.grad, q.grad = gr.float(), gr.clone()
        if step == 3:  # a weight without a gradient is left alone, as AdamW leaves it
            ref[1].grad = low[1].grad = None
        ref_opt.step()
        opt.step()
    for p, q in zip(ref, low):
        master = opt.state[q]["master"]
        assert master.dtype == torch.float32 and q.dtype == torch.bfloat16
        torch.testing.assert_close(master, p.detach(), rtol=0, atol=0)
        assert torch.equal(q.detach(), master.to(torch.bfloat16))
    assert not torch.equal(low[0].detach().float(), _pair(0)[1][0].detach().float()), "the weights moved"


def test_the_fp32_state_survives_a_state_dict_round_trip_and_fp32_weights_are_their_own_master():
    _, low = _pair(2)
    fp32 = torch.nn.Parameter(torch.randn(4, 4))
    params = [*low, fp32]
    opt = MasterAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[fp32]["master"].data_ptr() == fp32.data_ptr(), "no copy of an fp32 weight"
    saved = copy.deepcopy(opt.state_dict())  # as from a file: torch's state_dict shares the step counters
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = MasterAdamW(twins, lr=1e-2)
    again.load_state_dict(saved)
    for p, q in zip(params, twins):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert again.state[q][key].dtype == torch.float32, key
            assert torch.equal(again.state[q][key], opt.state[p][key]), key
    assert again.state[twins[-1]]["master"].data_ptr() == twins[-1].data_ptr()
    for p in (*params, *twins):
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    again.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())


def test_a_run_keeps_bf16_weights_and_resumes_exactly(tiny, tmp_path):
    steps = ("trainer.max_steps=6", "trainer.val_every=3")
    whole = train(compose(tiny(*MW, *steps, f"out_dir={tmp_path / 'a'}")))
    part = train(compose(tiny(*MW, *steps, "trainer.stop_at_step=3", f"out_dir={tmp_path / 'b'}")))
    resumed = train(compose([f"out_dir={tmp_path / 'b'}", f"resume={part.run_id}", "trainer.stop_at_step=null"]))
    ckpts = [torch.load(r.run_dir / "checkpoints" / "last.ckpt", weights_only=True) for r in (whole, resumed)]
    for key, w in ckpts[0]["state_dict"].items():
        if w.is_floating_point():
            assert w.dtype == torch.bfloat16, key
        torch.testing.assert_close(w, ckpts[1]["state_dict"][key], rtol=0, atol=0, msg=key)
    states = [c["optimizer_states"][0]["state"] for c in ckpts]
    assert states[0].keys() == states[1].keys() and states[0]
    for i, state in states[0].items():
        assert state["master"].dtype == torch.float32
        for key in ("master", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], states[1][i][key], rtol=0, atol=0)
    assert resumed.metrics["val/loss"] == pytest.approx(whole.metrics["val/loss"], abs=0)
    model, _ = load_model(whole.run_dir / "checkpoints" / "best.ckpt")  # the checkpoint serves generation
    assert generate(model, torch.tensor([list(b"def ")]), 8, temperature=0).shape == (1, 8)


@pytest.mark.parametrize("extra,match", [
    (("trainer.precision=32-true",), "not trainer.precision=32-true"),
    (("trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2"), "accumulate_grad_batches=1, not 2"),
    (("trainer.precision=bf16-mixed", "trainer.strategy=fsdp"), "trainer.strategy=auto or ddp"),
])
def test_configs_it_cannot_run_with_fail_at_compose(tiny, extra, match):
    with pytest.raises(ValueError, match=match):
        compose(tiny("optim.master_weights=true", *extra))


def test_auto_precision_without_a_gpu_is_refused_before_the_run(tiny, tmp_path, capsys):
    assert main_train(tiny("optim.master_weights=true")) == 2
    err = capsys.readouterr().err
    assert "trainer.precision=auto is 32-true without a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
