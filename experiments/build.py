"""Build the model a resolved run config describes."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from blocks.model import LM, ModelConfig
from blocks.moe import MoEConfig


def _named(node: DictConfig) -> tuple[str, dict]:
    fields = OmegaConf.to_container(node, resolve=True)
    return fields.pop("name"), fields


def build_model(cfg: DictConfig, vocab_size: int | None = None) -> LM:
    """The LM for `cfg`; `vocab_size` (from the data) fills model.vocab_size when that is unset."""
    model_fields = OmegaConf.to_container(cfg.model, resolve=True)
    if model_fields["vocab_size"] is None:
        model_fields["vocab_size"] = vocab_size
    elif vocab_size is not None and vocab_size > model_fields["vocab_size"]:
        raise ValueError(
            f"the data has {vocab_size} token ids but model.vocab_size={model_fields['vocab_size']}; "
            "raise model.vocab_size or leave it unset (null) to take the data's"
        )
    if model_fields["vocab_size"] is None:
        raise ValueError("model.vocab_size is unset and no data vocabulary was given")
    mixer, mixer_fields = _named(cfg.mixer)
    router, router_fields = _named(cfg.router)
    moe = MoEConfig(**OmegaConf.to_container(cfg.moe, resolve=True), router=router, router_cfg=router_fields)
    return LM(ModelConfig(**model_fields), mixer, mixer_fields, moe)
