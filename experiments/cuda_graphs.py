"""Recurrent decoding from static buffers, with the whole model's one-token step captured in a CUDA graph.

Decoding one token runs a few hundred small kernels; launched one by one from Python, their launch cost
exceeds their run time. `StaticDecoder` keeps every tensor the step touches at a fixed address (the
recurrent cache, the input token, the sampling noise), so the step (`LM.step` plus picking the next token)
can be captured once into a torch.cuda.CUDAGraph and replayed per token with a single launch. Without
capture (on the CPU, or `capture=False`) it runs exactly the same code eagerly, which is how the tests
check it against the plain loop (experiments.decoding.generate_eager).

The prompt is prefilled by the parallel forward into the same static cache, then the graph is replayed.
Sampling draws its Exp(1) noise outside the graph with the caller's generator (one kernel per token, the
same numbers the plain loop draws), so both paths give the same tokens for a fixed seed.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blocks.model import LM
from experiments.decoding import draw_noise, noise_width, pick_token


def reset_cache(cache: list) -> None:
    """Zero every tensor of every block's cache in place, so a new sequence starts from an empty state
    while the addresses a captured graph reads stay the same."""
    for block_cache in cache:
        if block_cache is None:
            continue
        if dataclasses.is_dataclass(block_cache):
            tensors = [getattr(block_cache, f.name) for f in dataclasses.fields(block_cache)]
        elif isinstance(block_cache, (list, tuple)):
            tensors = list(block_cache)
        else:
            tensors = [block_cache]
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"static decoding resets each cache in place and needs it to hold only tensors; "
                    f"{type(block_cache).__name__} holds a {type(t).__name__}"
                )
            t.zero_()


class StaticDecoder:
    """Generates from one model at a fixed batch size, context length and sampling rule.

    max_len bounds prompt + generated tokens (it sizes attention's KV cache). capture=True records the step
    in a CUDA graph (the model must be on a CUDA device); capture=False runs the same step eagerly.
    Reuse one decoder for many prompts of its batch size: capture happens once, in the constructor.
    """

    def __init__(
        self,
        model: LM,
        batch_size: int,
        max_len: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        capture: bool = True,
        warmup_steps: int = 2,
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        self.model = model
        self.batch_size, self.max_len = batch_size, max_len
        self.sampling = (temperature, top_k, top_p)
        self.device = model.embedding.weight.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA-graph decoding needs the model on a CUDA device; it is on {self.device}")
        self.cache = model.allocate_cache(batch_size, max_len, device=self.device)
        self.token_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        vocab = model.embedding.num_embeddings
        sampled = temperature > 0
        self.noise_BN = torch.ones(batch_size, noise_width(vocab, top_k), device=self.device) if sampled else None
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture(warmup_steps)

    @torch.no_grad()
    def _step(self) -> None:
        """The captured work: advance the cache by token_B and overwrite token_B with the next token."""
        logits_BV = self.model.step(self.token_B, self.cache)
        self.token_B.copy_(pick_token(logits_BV, self.noise_BN, *self.sampling))

    def _capture(self, warmup_steps: int) -> None:
        # Warm-up on a side stream first, as torch's CUDA-graph notes ask: lazy initialisation (cuBLAS
        # handles, Triton compilation and autotuning) must not happen during capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                reset_cache(self.cache)  # keeps attention's write position inside the cache
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        reset_cache(self.cache)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        reset_cache(self.cache)

    def advance(self, generator: torch.Generator | None = None) -> Tensor:
        """One decoding step from token_B (replayed graph or eager); returns token_B, now the next token."""
        if self.noise_BN is not None:
            draw_noise(self.noise_BN, generator)
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        return self.token_B

    @torch.no_grad()
    def prefill(self, prompt_BL: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Start a new sequence: parallel forward of the prompt into the emptied cache; returns the first token."""
        B, L = prompt_BL.shape
        if B != self.batch_size:
            raise ValueError(f"this decoder was built for batch {self.batch_size}, got a prompt batch of {B}")
        if L >= self.max_len:
            raise ValueError(f"a prompt of {L} tokens leaves no room in a decoder of max_len {self.max_len}")
        reset_cache(self.cache)
        logits_BLV, _ = self.model(prompt_BL.to(self.device), self.cache)
        if self.noise_BN is not None:
            draw_noise(self.noise_BN, generator)
        self.token_B.copy_(pick_token(logits_BLV[:, -1], self.noise_BN, *self.sampling))
        return self.token_B

    @torch.no_grad()
    def generate(self, prompt_BL: Tensor, max_new_tokens: int, generator: torch.Generator | None = None) -> Tensor:
        """Continue each prompt by max_new_tokens: (B, max_new_tokens) token ids."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        L = prompt_BL.shape[1]
        # the bound the device cannot check without a synchronisation: attention writes at position L + i
        if L + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds this decoder's max_len {self.max_len}"
            )
        out_BN = torch.empty(self.batch_size, max_new_tokens, dtype=torch.long, device=self.device)
        out_BN[:, 0] = self.prefill(prompt_BL, generator)
        for i in range(1, max_new_tokens):
            out_BN[:, i] = self.advance(generator)
        return out_BN
