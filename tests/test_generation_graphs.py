"""Static-buffer decoding (the code a CUDA graph captures, run eagerly on the CPU) and the sync-free step.

StaticDecoder must give exactly the tokens of the plain `generate` loop and of re-running the whole
sequence, for every mixer, MoE router and dense MLP, batch 1 and 3, greedy and sampled. The step it
captures must not synchronise with the host; on the CPU that is checked structurally: every aten op
the step runs goes through a dispatch mode that raises on the ops that read device memory back.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blocks.kernels import force_triton
from blocks.model import LM, ModelConfig
from blocks.moe import MoE, MoEConfig
from blocks.moe_decode import moe_step
from experiments.cuda_graphs import StaticDecoder, reset_cache
from experiments.generation import generate, generate_by_reforward, sample_next

MIXERS = {
    "mamba": {},
    "mamba2": {"headdim": 16, "d_state": 8, "chunk_size": 4},
    "attention": {"n_heads": 4},
}
# (mlp kind, router, top_k): sinkhorn and top-k MoE, top-2 (a batch of 3 then takes the all-experts path), dense
MLPS = [("moe", "sinkhorn", 1), ("moe", "topk", 2), ("mlp", "sinkhorn", 1)]


def tiny_lm(mixer: str, mlp: str = "moe", router: str = "sinkhorn", top_k: int = 1, **moe_extra) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, ffn_dim=48, mlp=mlp)
    moe = MoEConfig(num_experts=4, top_k=top_k, router=router, **moe_extra)
    return LM(cfg, mixer, MIXERS[mixer] or None, moe).eval()


def prompt(batch: int, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mlp,router,top_k", MLPS)
@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("batch", [1, 3])
def test_static_decoder_gives_the_plain_and_reforward_tokens(mixer, mlp, router, top_k, batch):
    model = tiny_lm(mixer, mlp, router, top_k)
    idx = prompt(batch)
    decoder = StaticDecoder(model, batch, 5 + 12, temperature=0, capture=False)
    static = decoder.generate(idx, 12)
    assert torch.equal(static, generate(model, idx, 12, temperature=0, cuda_graph=False))
    assert torch.equal(static, generate_by_reforward(model, idx, 12))
    # sampled: the same generator seed gives the same tokens on both paths
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    decoder = StaticDecoder(model, batch, 5 + 12, temperature=1.0, top_k=20, top_p=0.9, capture=False)
    sampled = decoder.generate(idx, 12, seed())
    assert torch.equal(sampled, generate(model, idx, 12, 1.0, 20, 0.9, seed(), cuda_graph=False))
    assert not torch.equal(sampled, static), "sampling at temperature 1 should leave the greedy path"


def test_a_decoder_is_reusable_and_resets_its_cache():
    model = tiny_lm("attention")
    decoder = StaticDecoder(model, 2, 16, temperature=0, capture=False)
    a, b = prompt(2), torch.randint(0, 64, (2, 7))
    first = decoder.generate(a, 9)
    decoder.generate(b, 9)
    assert torch.equal(decoder.generate(a, 9), first)
    assert torch.equal(first, generate(model, a, 9, temperature=0))


def test_decoder_bounds_and_errors():
    model = tiny_lm("attention")
    decoder = StaticDecoder(model, 2, 8, temperature=0, capture=False)
    with pytest.raises(ValueError, match="max_len 8"):
        decoder.generate(prompt(2), 4)
    with pytest.raises(ValueError, match="batch 2"):
        decoder.generate(prompt(3), 2)
    with pytest.raises(ValueError, match="CUDA device"):
        StaticDecoder(model, 1, 8, capture=True)
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, prompt(1), 2, cuda_graph=True)
    with pytest.raises(TypeError, match="only tensors"):
        reset_cache([object()])


def test_exponential_race_samples_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, None, None, gen), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    top2 = sample_next(logits, 1.0, 2, None, gen)
    assert set(top2.unique().tolist()) == {0, 1}
    nucleus = sample_next(logits, 1.0, None, 0.5, gen)  # p(0) = 0.64 alone reaches 0.5
    assert set(nucleus.unique().tolist()) == {0}


@pytest.mark.parametrize("router,top_k,batch", [("sinkhorn", 1, 1), ("topk", 2, 1), ("topk", 2, 3), ("sinkhorn", 1, 5)])
def test_moe_decode_path_equals_forward(router, top_k, batch):
    # T * K < E gathers each slot's expert; otherwise every expert runs and the gates combine them
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=top_k, router=router, num_shared_experts=1), 24).eval()
    x = torch.randn(batch, 16)
    torch.testing.assert_close(moe_step(moe, x), moe(x[:, None])[0][:, 0], rtol=1e-5, atol=1e-6)


def test_moe_decode_path_on_the_gpu_kernels_equals_forward():
    # what CUDA runs below one slot per expert: the routed-expert decoding kernels (here through the interpreter)
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=1, router="sinkhorn"), 16).eval()
    x = torch.randn(2, 16)
    with force_triton():
        got = moe_step(moe, x)
    torch.testing.assert_close(got, moe_step(moe, x), rtol=1e-5, atol=1e-6)


def test_moe_decode_path_honours_a_routing_mask():
    # expert-choice in training mode leaves slots empty: they must contribute nothing, as in forward
    with pytest.warns(UserWarning, match="not causal"):
        moe = MoE(16, MoEConfig(num_experts=4, top_k=1, router="expert_choice"), 24)
    x = torch.randn(6, 16)
    torch.testing.assert_close(moe_step(moe, x), moe(x[None])[0][0], rtol=1e-5, atol=1e-6)


# --- the step never synchronises with the host -------------------------------------------------------------

class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises on every aten op that needs device values on the host: .item() / bool() / int() / float()
    (aten._local_scalar_dense), torch.multinomial (its input check reads back), outputs shaped by data
    (nonzero, masked_select, unique, repeat_interleave by a tensor), and boolean-mask indexing."""

    SYNCING = ("_local_scalar_dense", "multinomial", "nonzero", "masked_select", "_unique", "unique_",
               "repeat_interleave.Tensor")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(s in name for s in self.SYNCING):
            raise HostSyncError(f"{name} synchronises with the host")
        if func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            raise HostSyncError("boolean-mask indexing has a data-dependent shape")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """NoHostSync, and Tensor.tolist refused too (it reads memory without an aten op)."""
    def refuse(*_a, **_k):
        raise HostSyncError("Tensor.tolist synchronises with the host")

    tolist = torch.Tensor.tolist
    torch.Tensor.tolist = refuse
    try:
        with NoHostSync():
            yield
    finally:
        torch.Tensor.tolist = tolist


@pytest.mark.parametrize("mlp,router,top_k", [*MLPS, ("moe", "expert_choice", 1)])
@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("temperature", [0, 1.0])
@pytest.mark.filterwarnings("ignore:router=expert_choice")
def test_the_captured_step_does_not_synchronise(mixer, mlp, router, top_k, temperature):
    model = tiny_lm(mixer, mlp, router, top_k)
    decoder = StaticDecoder(model, 3, 10, temperature, top_k=5, top_p=0.9, capture=False)
    decoder.prefill(prompt(3))  # prefill is not captured and may read back (attention's start position)
    with no_host_sync():
        for _ in range(3):
            decoder._step()


def test_the_sync_guard_catches_syncs():
    x = torch.randn(4)
    for syncing in (
        lambda: x.sum().item(),
        lambda: bool(x.sum() > 0),
        lambda: x[x > 0],
        lambda: torch.nonzero(x),
        lambda: x.tolist(),
        lambda: torch.multinomial(x.softmax(0), 1),  # what sampling used before the exponential race
        lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 1])),
    ):
        with no_host_sync(), pytest.raises(HostSyncError):
            syncing()


def test_truncated_probs_keeps_the_top_k_then_the_nucleus_within_them():
    from experiments.decoding import truncated_probs

    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    torch.testing.assert_close(truncated_probs(logits, 1.0, None, None), torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    # top-2: 0.4 and 0.3, renormalised
    torch.testing.assert_close(truncated_probs(logits, 1.0, 2, None), torch.tensor([[0, 4 / 7, 0, 3 / 7, 0]]))
    # nucleus 0.6: 0.4 alone is short of it, 0.4 + 0.3 reaches it
    torch.testing.assert_close(truncated_probs(logits, 1.0, None, 0.6), torch.tensor([[0, 4 / 7, 0, 3 / 7, 0]]))
    # top-4 (0.4, 0.3, 0.15, 0.1 -> 0.421, 0.316, 0.158, 0.105), then a 0.75 nucleus within them: the first two
    # hold 0.737 of the mass, so the third is kept too (of the whole vocabulary they hold 0.7, short of 0.75)
    got = truncated_probs(logits, 1.0, 4, 0.75)
    torch.testing.assert_close(got, torch.tensor([[0, 0.4, 0, 0.3, 0.15]]) / 0.85)
    # the top-k path equals masking the vocabulary and sorting all of it, on random logits
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=g) * 3
    kth = torch.topk(x, 40, dim=-1).values[:, -1:]
    masked = x.masked_fill(x < kth, float("-inf"))
    torch.testing.assert_close(truncated_probs(x, 0.7, 40, 0.8), truncated_probs(masked, 0.7, None, 0.8))


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (4, 0.75), (None, 0.6)])
def test_sampled_tokens_follow_the_truncated_probs(top_k, top_p):
    """The exponential race (over the k candidates with top_k, over the vocabulary otherwise) draws each token
    with its truncated_probs probability: frequencies over 40,000 rows within 5 standard errors, and no token
    outside the truncation is ever drawn."""
    from experiments.decoding import noise_width, sample_next, truncated_probs

    n = 40_000
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])).expand(n, 5)
    want = truncated_probs(logits[:1], 0.9, top_k, top_p)[0]
    tokens = sample_next(logits, 0.9, top_k, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).double() / n
    se = (want.double() * (1 - want.double()) / n).sqrt()
    assert torch.all((freq - want.double()).abs() <= 5 * se + 1e-12), (freq, want)
    assert torch.all(freq[want == 0] == 0)
    assert noise_width(5, top_k) == (min(top_k, 5) if top_k else 5)


def test_pick_token_rejects_noise_of_the_wrong_width():
    from experiments.decoding import pick_token

    with pytest.raises(ValueError, match="3 noise draws"):
        pick_token(torch.randn(2, 10), torch.ones(2, 10), 1.0, 3, None)
