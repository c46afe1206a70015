"""AdamW over fp32 master copies of low-precision weights (optim.master_weights).

Under bf16-mixed with fp32 weights, autocast casts every weight to bf16 at each use in the forward and casts
its gradient back in the backward: per weight two more kernels a step, launched from Python; a BlackMamba-1.5B
fwd+bwd took 166.6 ms with fp32 weights against 143.3 ms with bf16 weights (benchmarks/RESULTS.md, one H100,
same process). With master weights the model's parameters are stored in bf16, so the forward
and backward read and write bf16 directly (autocast finds nothing to cast), while the update keeps fp32
precision: this optimizer holds an fp32 copy of every weight (state "master") with AdamW's moments, applies
AdamW to the copy with the gradient in fp32, and writes the copy, rounded, back into the bf16 weight. That is
the bf16 recipe of large-model training (fp32 "main" parameters behind bf16 model parameters).

On a GPU each weight's step is one Triton kernel (blocks/kernels/adamw.py: the gradient read in bf16, the
master, the moments and the rounded weight written in the same pass); elsewhere, or for tensors it does not
take, torch's AdamW functional on the masters, then a copy into the weights.

The state (master, exp_avg, exp_avg_sq) is fp32 whatever the weights' dtype, in memory and in checkpoints, so
a resumed run continues from the exact fp32 weights, not from their bf16 rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from blocks.kernels import use_triton

FP32_STATE = ("master", "exp_avg", "exp_avg_sq")


class MasterAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same arguments, param groups and state_dict layout) whose update runs on fp32
    masters of the parameters; `masters` maps a parameter to its initial fp32 value (default: the parameter
    itself, upcast). fp32 parameters are their own master."""

    def __init__(self, params, *args, masters: dict[Tensor, Tensor] | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        if any(g["amsgrad"] for g in self.param_groups):
            raise ValueError("MasterAdamW does not implement amsgrad")
        for p, value in (masters or {}).items():
            if value.shape != p.shape:
                raise ValueError(f"a master of shape {tuple(value.shape)} for a parameter of {tuple(p.shape)}")
            self.state[p]["master"] = self._master_of(p, value)

    @staticmethod
    def _master_of(p: Tensor, value: Tensor) -> Tensor:
        if p.dtype == torch.float32 and value is p:
            return p.detach()  # its own master: no copy
        return value.detach().to(device=p.device, dtype=torch.float32, copy=True)

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "master" not in state:
            state["master"] = self._master_of(p, p)
        if "step" not in state:  # on the host, where the kernel reads it (torch's fused path moves it: step)
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, masters, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MasterAdamW does not support sparse gradients")
                state = self._state(p)
                params.append(p)
                masters.append(state["master"])
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            if self._kernel_step(group, params, grads, masters, exp_avgs, exp_avg_sqs):
                continue
            beta1, beta2 = group["betas"]
            grads = [g.float() for g in grads]  # the gradient itself where it is fp32 already
            if group["fused"] or group["capturable"]:  # torch keeps their step counts on the device
                for p, s in zip(params, steps):
                    if s.device != p.device:
                        self.state[p]["step"] = s.to(p.device)
                steps = [self.state[p]["step"] for p in params]
            adamw(masters, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                  capturable=group["capturable"], differentiable=False, fused=group["fused"], amsgrad=False,
                  beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                  maximize=group["maximize"])
            # the updated masters, rounded, into the weights the model computes with (fp32 ones are the master)
            low = [(p, m) for p, m in zip(params, masters) if p.data_ptr() != m.data_ptr()]
            if low:
                torch._foreach_copy_([p for p, _ in low], [m for _, m in low])
        return loss

    def _kernel_step(self, group, params, grads, masters, exp_avgs, exp_avg_sqs) -> bool:
        """The group's step with the Triton kernel, one launch per weight; False (nothing done) where it does
        not apply: off the GPU, maximize or capturable, a non-contiguous tensor."""
        tensors = (*params, *grads, *masters, *exp_avgs, *exp_avg_sqs)
        if group["maximize"] or group["capturable"] or not use_triton(*tensors):
            return False
        if not all(t.is_contiguous() for t in tensors):
            return False
        from blocks.kernels.adamw import master_adamw_triton_

        beta1, beta2 = group["betas"]
        for p, g, master, m, v in zip(params, grads, masters, exp_avgs, exp_avg_sqs):
            state = self.state[p]
            if state["step"].is_cuda:  # where fused AdamW keeps it; the kernel takes it as a host number
                state["step"] = state["step"].cpu()
            state["step"] += 1
            master_adamw_triton_(p.data, g, master, m, v,
                                 step=int(state["step"]), lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                 eps=group["eps"], weight_decay=group["weight_decay"])
        return True

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts floating state to each parameter's dtype, which would round the masters and
        moments to bf16: put the saved fp32 values back after it. An fp32 parameter's master is the parameter
        itself, with the saved value copied in."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            state = self.state.get(p)
            if i not in saved or state is None:
                continue
            for key in FP32_STATE:
                if key in saved[i]:
                    state[key] = saved[i][key].to(device=p.device, dtype=torch.float32, copy=True)
            if p.dtype == torch.float32 and "master" in state:  # one tensor again: the parameter is its master
                p.copy_(state["master"])
                state["master"] = p.detach()
