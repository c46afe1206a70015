"""Routing rules for MoE layers behind one contract (`routers.base.Router`), and their registry."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from routers.base import Router, Routing, count_per_expert, router_z_loss, switch_balance_loss
from routers.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter
from routers.sinkhorn import SinkhornConfig, SinkhornRouter
from routers.topk import Top1Router, TopKConfig, TopKRouter

ROUTERS: dict[str, tuple[type, type[Router]]] = {
    "top1": (TopKConfig, Top1Router),
    "topk": (TopKConfig, TopKRouter),
    "sinkhorn": (SinkhornConfig, SinkhornRouter),
    "expert_choice": (ExpertChoiceConfig, ExpertChoiceRouter),
}


def _hint(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_router(name: str, num_experts: int, top_k: int, cfg: Any = None) -> Router:
    """Build the router registered as `name`. `cfg` is None (defaults), a mapping of overrides,
    or the router's own config dataclass."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}{_hint(name, ROUTERS)}; valid routers: {', '.join(ROUTERS)}")
    cfg_cls, router_cls = ROUTERS[name]
    if cfg is None:
        cfg = cfg_cls()
    elif isinstance(cfg, Mapping):
        valid = [f.name for f in dataclasses.fields(cfg_cls)]
        for key in cfg:
            if key not in valid:
                raise ValueError(
                    f"unknown key {key!r} for router {name!r}{_hint(key, valid)}; valid keys: {', '.join(valid)}"
                )
        cfg = cfg_cls(**dict(cfg))
    elif not isinstance(cfg, cfg_cls):
        raise ValueError(f"router {name!r} takes a {cfg_cls.__name__} or a dict, got {type(cfg).__name__}")
    return router_cls(num_experts, top_k, cfg)


__all__ = [
    "ROUTERS",
    "ExpertChoiceConfig",
    "ExpertChoiceRouter",
    "Router",
    "Routing",
    "SinkhornConfig",
    "SinkhornRouter",
    "Top1Router",
    "TopKConfig",
    "TopKRouter",
    "build_router",
    "count_per_expert",
    "router_z_loss",
    "switch_balance_loss",
]
