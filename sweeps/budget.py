"""Budgets that make trials comparable: the same training tokens, the same training FLOPs, or tokens in
proportion to each model's active parameters (Chinchilla-style, for scaling grids).

    budget: {tokens: 2.0e6}            # max_steps = tokens / (batch_size * seq_len * accumulate)
    budget: {flops: 1.0e15}            # max_steps = flops / (train_flops_per_token * tokens per step)
    budget: {tokens_per_param: 20}     # tokens = 20 * active parameters, then as for tokens
    budget: {reports: 4}               # validations per trial (the pruner's intermediate values)

With no kind given, the budget is the tokens of the base config (trainer.max_steps * tokens per step).
FLOPs per token come from blocks.accounting on a model built on the meta device (no memory, no time).
A trial validates every max_steps // reports steps, and max_steps is rounded to the nearest multiple of
that, so that the last step is validated; the trial's user attributes record what it actually trained.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from blocks.accounting import Accounting, account
from experiments.build import build_model
from experiments.config import ConfigError
from experiments.data import DataConfig, TokenDataModule

KINDS = ("tokens", "flops", "tokens_per_param")
KEYS = (*KINDS, "reports")


@dataclass
class Plan:
    max_steps: int
    val_every: int
    tokens: int
    train_flops: float
    accounting: Accounting


@functools.lru_cache(maxsize=8)
def _data_vocab(data_yaml: str) -> int:
    return TokenDataModule(DataConfig(**OmegaConf.to_container(OmegaConf.create(data_yaml)))).vocab_size


def accounting(cfg: DictConfig) -> Accounting:
    """Parameters and FLOPs of the model `cfg` describes, counted on the meta device."""
    try:
        vocab = cfg.model.vocab_size or _data_vocab(OmegaConf.to_yaml(cfg.data))
        with torch.device("meta"):
            model = build_model(cfg, vocab)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None
    return account(model, cfg.data.seq_len)


def tokens_per_step(cfg: DictConfig) -> int:
    return cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches


def resolve(budget: dict[str, Any], base: DictConfig) -> dict[str, Any]:
    """The study's budget, checked: one kind and its amount, and `reports`."""
    for key in budget:
        if key not in KEYS:
            raise ConfigError(f"unknown budget key '{key}'. Valid keys: {', '.join(KEYS)}")
    kinds = [k for k in KINDS if budget.get(k) is not None]
    if len(kinds) > 1:
        raise ConfigError(f"give one budget kind, not {' and '.join(kinds)}")
    reports = budget.get("reports", 4)
    if isinstance(reports, bool) or not isinstance(reports, int) or reports < 1:
        raise ConfigError(f"budget.reports must be an integer >= 1, got {reports!r}")
    if not kinds:
        return {"tokens": base.trainer.max_steps * tokens_per_step(base), "reports": reports}
    amount = budget[kinds[0]]
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
        raise ConfigError(f"budget.{kinds[0]} must be a number > 0, got {amount!r}")
    return {kinds[0]: int(amount) if kinds[0] == "tokens" else float(amount), "reports": reports}


def describe(budget: dict[str, Any]) -> str:
    if "tokens" in budget:
        return f"fixed tokens per trial: {budget['tokens']:,} (max_steps = tokens / tokens per step)"
    if "flops" in budget:
        return (f"fixed training FLOPs per trial: {budget['flops']:.3g} "
                "(max_steps = FLOPs / (FLOPs per token * tokens per step))")
    return (f"tokens = {budget['tokens_per_param']:g} x active parameters per trial "
            "(max_steps = tokens / tokens per step)")


def plan(cfg: DictConfig, budget: dict[str, Any]) -> Plan:
    """max_steps and val_every for one trial's config under the study's budget."""
    acc = accounting(cfg)
    per_step = tokens_per_step(cfg)
    if "tokens" in budget:
        steps = budget["tokens"] / per_step
    elif "flops" in budget:
        steps = budget["flops"] / (acc.train_flops_per_token * per_step)
    else:
        steps = budget["tokens_per_param"] * acc.active_params / per_step
    steps = max(1, round(steps))
    val_every = max(1, steps // budget["reports"])
    steps = max(val_every, round(steps / val_every) * val_every)
    return Plan(steps, val_every, steps * per_step, steps * per_step * acc.train_flops_per_token, acc)
