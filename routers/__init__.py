"""Routing rules for MoE layers behind one contract (`routers.base.Router`), and their registry."""
from __future__ import annotations

from typing import Any

from blocks.registry import lookup, make_config, register

from routers.balancing import StepLoad
from routers.base import Router, Routing, balance_loss, count_per_expert, router_z_loss, switch_balance_loss
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


def register_router(name: str, config_cls: type):
    """Class decorator: register a Router subclass as `name` (router=<name>), built as
    cls(num_experts, top_k, config_cls(...)).

        @register_router("my_router", MyRouterConfig)
        class MyRouter(Router): ...

    Raises ValueError for a name already taken, a config that is not a dataclass, or a class that is no Router."""

    def decorate(cls: type) -> type:
        register(ROUTERS, name, config_cls, cls, Router, "router")
        return cls

    return decorate


__all__ = [
    "ROUTERS",
    "ExpertChoiceConfig",
    "ExpertChoiceRouter",
    "Router",
    "Routing",
    "SinkhornConfig",
    "SinkhornRouter",
    "StepLoad",
    "Top1Router",
    "TopKConfig",
    "TopKRouter",
    "balance_loss",
    "build_router",
    "count_per_expert",
    "register_router",
    "router_z_loss",
    "switch_balance_loss",
]
