"""trainer.cuda_graph (experiments/train_graph.py): the Lightning plumbing of a replayed training step, run on the
CPU with capture=False (the same static-buffer code, executed eagerly instead of replayed): it trains to the same
weights as the plain step; a refused capture or a batch of another shape falls back to eager steps; impossible
settings fail before any run. The capture itself needs a GPU: benchmarks/bench_train.py checks it there."""
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from experiments.config import ConfigError, compose
from experiments.train import train
from experiments.train_graph import TrainGraph
from routers.balancing import StepLoad


class UseGraph(Callback):
    """Puts a TrainGraph on the module at fit start and counts the steps it ran."""

    def __init__(self, graph: TrainGraph):
        self.graph = graph
        self.replayed = 0

    def on_fit_start(self, trainer, pl_module):
        pl_module.train_graph = self.graph

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.replayed += self.graph.recorded and self.graph.disabled is None


def final_weights(out_dir, run_id) -> dict:
    ckpt = torch.load(out_dir / "runs" / run_id / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]


def train_weights(tiny, tmp_path, name, callbacks, *extra):
    out = tmp_path / name
    result = train(compose(tiny(f"out_dir={out}", "trainer.max_steps=5", "trainer.val_every=5", *extra)),
                   callbacks=callbacks)
    return final_weights(out, result.run_id)


@pytest.mark.parametrize("router", ["sinkhorn", "aux_free"])  # aux_free: a StepLoad carried from step to step
def test_graph_path_trains_to_the_same_weights_as_the_plain_step(tiny, tmp_path, router):
    plain = train_weights(tiny, tmp_path, "plain", [], f"router={router}")
    probe = UseGraph(TrainGraph(warmup_steps=2, capture=False))
    graphed = train_weights(tiny, tmp_path, "graph", [probe], f"router={router}")
    assert probe.replayed == 3  # steps 3-5 ran through the static buffers, with the backward skipped
    assert plain.keys() == graphed.keys()
    for k, w in plain.items():
        torch.testing.assert_close(graphed[k], w, rtol=1e-6, atol=1e-7, msg=k)


class RefusingGraph(TrainGraph):
    def _record(self, module, fn, batch):
        super()._record(module, fn, batch)
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_refused_capture_warns_and_training_goes_on_eagerly(tiny, tmp_path):
    plain = train_weights(tiny, tmp_path, "plain", [])
    probe = UseGraph(RefusingGraph(warmup_steps=1, capture=False))
    with pytest.warns(UserWarning, match="capturing the training step failed .*training goes on eagerly"):
        graphed = train_weights(tiny, tmp_path, "graph", [probe])
    assert probe.replayed == 0 and "not permitted" in probe.graph.disabled
    for k, w in plain.items():
        torch.testing.assert_close(graphed[k], w, rtol=1e-6, atol=1e-7, msg=k)


def test_a_batch_of_another_shape_runs_eagerly():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)

    def fn(batch):
        loss = model(batch[0]).square().mean()
        return loss, {}, loss

    graph = TrainGraph(warmup_steps=1, capture=False)
    x = torch.randn(4, 3)
    assert graph.run(model, fn, (x,)) is None  # warm-up: the caller runs it
    lm_loss, aux, loss = graph.run(model, fn, (x,))
    torch.testing.assert_close(loss, model(x).square().mean().detach())
    # the gradient is the whole step's, not added to the last one's
    expected = torch.autograd.grad(model(x).square().mean(), model.weight)[0]
    torch.testing.assert_close(model.weight.grad, expected)
    with pytest.warns(UserWarning, match="differs from the captured"):
        assert graph.run(model, fn, (torch.randn(5, 3),)) is None
    assert graph.run(model, fn, (torch.randn(4, 3),)) is not None


def test_step_load_is_zeroed_in_place_at_the_end_of_a_step():
    # a captured step keeps adding into the same tensor, so end_step must not replace it
    load = StepLoad(3, bias_update_rate=0.1, keep_counts=True)
    load.observe(torch.tensor([4, 0, 1]))
    counts = load._step_counts
    load.end_step()
    assert load._step_counts is counts and counts.sum() == 0
    assert load.last_counts.tolist() == [4, 0, 1] and load.bias_steps.tolist() == [-1, 1, 1]
    load.end_step()  # a step that observed nothing leaves the bias alone
    assert load.bias_steps.tolist() == [-1, 1, 1]
    assert torch.allclose(load.frequencies(), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("extra,match", [
    (("trainer.accumulate_grad_batches=2",), "accumulate_grad_batches=1"),
    (("trainer.devices=2",), "several processes"),
    (("trainer.compile=true",), "trainer.compile"),
    (("trainer.accelerator=cpu",), "needs a CUDA GPU"),
])
def test_impossible_cuda_graph_settings_fail_before_any_run(tiny, extra, match):
    with pytest.raises(ValueError, match=match):
        compose(tiny("trainer.cuda_graph=true", *extra))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_graph_without_a_gpu_says_so(tiny):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train(compose(tiny("trainer.cuda_graph=true")))
