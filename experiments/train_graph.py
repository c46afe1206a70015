"""The training step's forward, loss and backward captured once in a CUDA graph and replayed (trainer.cuda_graph).

Eager, a BlackMamba-1.5B step at B 8 x L 2048 launches about 2,600 kernels from Python, and the host's work
to launch them (about 100 of the step's ~160 ms) leaves the GPU idle between short kernels. The platform's
forward and backward run at fixed shapes with no host synchronisation, so the whole of it can be recorded
once and replayed with one launch a step. The optimizer, the non-finite check, clipping and logging stay
outside the graph, as Lightning runs them.

What a replay needs, and how this keeps it:
- fixed addresses: each batch is copied into static input tensors; the gradients that the capture allocated
  are put back on the parameters before every replay and again where Lightning's backward would run (its
  closure calls zero_grad(set_to_none=True) between the two, and a skipped non-finite step drops them too);
  the optimizer updates the weights in place, which the graph then reads.
- the whole gradient written by every replay: the capture starts with no gradients, so the backward sets
  them rather than adding to them (hence trainer.accumulate_grad_batches=1).
- nothing made during the capture: `warmup_steps` eager steps first (Triton compiles and autotunes, routers
  and buffers settle), then one fwd+bwd on the capture's own stream (cuBLAS makes its handle and workspace
  per stream, which must not happen inside a capture), whose effect on the model's counters is undone.
- autocast without its cast cache inside the capture (a cache would hand stale casts to later replays).
A batch of another shape or dtype runs eagerly; if the capture fails, the run goes on eagerly, saying why once.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from routers.balancing import StepLoad

# (lm_loss, aux losses, total loss) of one batch: LMModule's forward and loss
ForwardLoss = Callable[[tuple[Tensor, ...]], tuple[Tensor, dict[str, Tensor], Tensor]]


def _accumulators(module: nn.Module) -> list[Tensor]:
    """Tensors a training forward adds into: the buffers (expert-utilization counters) and each router's
    running step load. The capture stream's warm-up must leave them as they were."""
    tensors = list(module.buffers())
    tensors += [m._step_counts for m in module.modules() if isinstance(m, StepLoad) and m._step_counts is not None]
    return tensors


class TrainGraph:
    """Runs LMModule's training fwd+bwd: eagerly for the first `warmup_steps` calls, then from one CUDA graph.

    `run` returns the step's (lm_loss, aux, loss), detached, with the gradients on the parameters (the
    backward has run), or None when the caller is to run the step eagerly itself. capture=False runs the
    same static-buffer code eagerly at every step instead of replaying (the CPU tests check it so).
    """

    def __init__(self, warmup_steps: int = 3, capture: bool = True):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (Triton autotunes in the first step), got {warmup_steps}")
        self.warmup_steps, self.capture = warmup_steps, capture
        self.calls = 0
        self.disabled: str | None = None  # why every step runs eagerly from now on
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: tuple[Tensor, ...] | None = None
        self.outputs: tuple | None = None
        self.params: list[nn.Parameter] = []
        self.grads: list[Tensor | None] = []
        self._fn: ForwardLoss | None = None
        self._warned_shape = False

    @property
    def recorded(self) -> bool:
        return self.static_batch is not None

    def run(self, module: nn.Module, fn: ForwardLoss, batch: tuple[Tensor, ...]):
        self.calls += 1
        if self.disabled is not None or self.calls <= self.warmup_steps:
            return None
        if self.recorded and not self._fits(batch):
            if not self._warned_shape:
                self._warned_shape = True
                warnings.warn(f"trainer.cuda_graph: a batch of shapes {[tuple(t.shape) for t in batch]} differs from "
                              f"the captured {[tuple(t.shape) for t in self.static_batch]}; such batches run eagerly",
                              stacklevel=2)
            return None
        if not self.recorded:
            try:
                self._record(module, fn, batch)
            except Exception as e:  # noqa: BLE001  (a capture the model refuses must not end the run)
                self._reset(module)
                self.disabled = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"trainer.cuda_graph: capturing the training step failed ({self.disabled}); "
                              "training goes on eagerly", stacklevel=2)
                return None
        self._replay(batch)
        lm_loss, aux, loss = self.outputs
        # copies: the next replay overwrites the static outputs, and the loggers may hold these a while
        return lm_loss.clone(), {k: v.clone() for k, v in aux.items()}, loss.clone()

    def _fits(self, batch) -> bool:
        return len(batch) == len(self.static_batch) and all(
            t.shape == s.shape and t.dtype == s.dtype and t.device == s.device for t, s in zip(batch, self.static_batch))

    def _reset(self, module: nn.Module) -> None:
        self.graph, self.static_batch, self.outputs, self.grads = None, None, None, []
        for p in module.parameters():
            p.grad = None

    @staticmethod
    def _fwd_bwd(fn: ForwardLoss, batch) -> tuple:
        device_type = batch[0].device.type
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False):
            lm_loss, aux, loss = fn(batch)
        with torch.autocast(device_type, enabled=False):  # the backward outside autocast, as Lightning runs it
            loss.backward()
        return lm_loss.detach(), {k: v.detach() for k, v in aux.items()}, loss.detach()

    def _record(self, module: nn.Module, fn: ForwardLoss, batch) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.static_batch = tuple(t.clone() for t in batch)
        self._fn = fn
        for p in self.params:  # no gradient at the start: the backward writes it whole
            p.grad = None
        if not self.capture:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        accumulators = _accumulators(module)
        saved = [t.clone() for t in accumulators]
        with torch.cuda.stream(stream):  # warm-up on the capture stream, outside the capture
            self._fwd_bwd(fn, self.static_batch)
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(accumulators, saved):
            t.copy_(s)
        for p in self.params:
            p.grad = None
        del saved
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks, before the graph takes its own pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.outputs = self._fwd_bwd(fn, self.static_batch)
        self.grads = [p.grad for p in self.params]
        self.graph = graph

    def _replay(self, batch) -> None:
        for s, t in zip(self.static_batch, batch):
            s.copy_(t, non_blocking=True)
        if self.graph is None:  # capture=False: the same step, eagerly, from the static inputs
            for p in self.params:
                p.grad = None
            self.outputs = self._fwd_bwd(self._fn, self.static_batch)
            self.grads = [p.grad for p in self.params]
            return
        self.attach_grads()
        self.graph.replay()

    def attach_grads(self) -> None:
        """Put the step's gradients (the graph's own tensors) back on the parameters. Lightning's closure calls
        zero_grad(set_to_none=True) between the training step and its backward, which drops them."""
        for p, g in zip(self.params, self.grads):
            p.grad = g
