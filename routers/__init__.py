"""Routing rules for MoE layers behind one contract (`routers.base.Router`), and their registry."""
from __future__ import annotations

from typing import Any

from blocks.registry import lookup, make_config

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


def build_router(name: str, num_experts: int, top_k: int, cfg: Any = None) -> Router:
    """Build the router registered as `name`. `cfg` is None (defaults), a mapping of overrides,
    or the router's own config dataclass."""
    cfg_cls, router_cls = lookup(ROUTERS, name, "router")
    return router_cls(num_experts, top_k, make_config(cfg_cls, cfg, f"router '{name}'"))


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
