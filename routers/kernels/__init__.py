"""Fused routing kernels (Triton) with their PyTorch reference twins.

Shapes: T tokens, E experts, k slots per token. All inputs are router logits_TE (T, E) fp32; the kernels
run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), the references anywhere.

    topk_gate(logits_TE, k, gate="softmax", renormalize=True, with_counts=False, bias_E=None) -> Gate
        Gate = (weights_TK (T, k) fp32, expert_ids_TK (T, k) int64, probs_TE (T, E) fp32,
                counts_E (E,) int32 or None); differentiable through weights_TK and probs_TE.
        bias_E (E,): a selection bias (auxiliary-loss-free balancing), added to the probabilities for the
        choice of experts only.
    sinkhorn_topk(logits_TE, k, temperature=0.5, n_iters=8) -> expert_ids_TK (T, k) int64
        top-k of the Sinkhorn plan (BlackMamba sec. 3.1), no gradient.

`topk_gate_ref` and `sinkhorn_topk_ref` take the same arguments and return the same outputs.
"""
from routers.kernels.sinkhorn import sinkhorn_topk
from routers.kernels.topk_gate import topk_gate
from routers.sinkhorn import sinkhorn_topk_ref
from routers.topk import Gate, topk_gate_ref

__all__ = ["Gate", "sinkhorn_topk", "sinkhorn_topk_ref", "topk_gate", "topk_gate_ref"]
