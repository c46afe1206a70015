"""Config composition: dataclass defaults <- conf/config.yaml <- group picks <- dotted overrides <- aliases.

    python run.py mixer=attention router=topk experts=4 top_k=2 model.d_model=256

A bare `group=choice` loads conf/<group>/<choice>.yaml; `a.b=value` sets one key; a short alias
(`experts=8`) stands for a dotted key. Group picks are split from dotted overrides before anything is
merged, so `router=sinkhorn router.n_iters=4` picks the file and then sets the key. Every key and type
is checked against the dataclasses that the components define, so a typo fails before any work starts.
Configs are data only: nothing in a YAML file can name code to import.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blocks import MIXERS
from blocks.model import ModelConfig
from blocks.moe import MoEConfig
from blocks.registry import lookup
from experiments.checkpoint import find_run_dir
from experiments.data import DataConfig
from routers import ROUTERS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Groups whose file is one config node (conf/mixer/mamba.yaml -> cfg.mixer), and groups whose file is a
# partial top-level config (a model preset sets model.* and moe.*; an experiment bundles any overrides).
NODE_GROUPS = ("mixer", "router", "data", "trainer")
GLOBAL_GROUPS = ("model", "experiment")
GROUPS = NODE_GROUPS + GLOBAL_GROUPS
ALIASES = {
    "experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "layers": "model.n_layers",
    "d_model": "model.d_model",
    "ffn": "model.ffn_dim",
    "steps": "trainer.max_steps",
    "lr": "optim.lr",
    "batch_size": "data.batch_size",
    "seq_len": "data.seq_len",
    "path": "data.path",
}


class ConfigError(ValueError):
    """A user error in the command line or a config file."""


@dataclass
class TrainerConfig:
    max_steps: int = 600  # optimizer steps; also the length of the cosine schedule
    val_every: int = 100  # validate (and checkpoint) every this many steps
    log_every: int = 10
    accelerator: str = "auto"  # auto: cuda when available, else cpu
    devices: int = 1
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true on CPU
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    compile: bool = False  # torch.compile the model
    stop_at_step: int | None = None  # end this invocation early (with a checkpoint); resume continues it
    progress_bar: bool = True


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps


@dataclass
class TrackingConfig:
    experiment: str = "blackmamba"  # MLflow experiment name
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    run_name: str | None = None


# The MoE node carries everything of MoEConfig except the router, which has its own group.
MoENode = dataclasses.make_dataclass(
    "MoENode",
    [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(MoEConfig) if f.name not in ("router", "router_cfg")],
)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: Any = None  # MoENode
    mixer: Any = None  # the picked mixer's config dataclass plus `name`
    router: Any = None  # the picked router's config dataclass plus `name`
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 1234
    out_dir: str = "outputs"
    resume: str | None = None  # "last" (or true): the newest run in out_dir; else a run id


def _named_node(registry: dict, name: str, kind: str) -> DictConfig:
    """A structured node for registry[name]'s config dataclass with an extra `name` field."""
    cfg_cls = lookup(registry, name, kind)[0]
    node_cls = dataclasses.make_dataclass(f"{cfg_cls.__name__}Node", [("name", str, field(default=name))], bases=(cfg_cls,))
    return OmegaConf.structured(node_cls)


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _load_group_file(group: str, choice: str) -> DictConfig:
    path = CONF_DIR / group / f"{choice}.yaml"
    if not path.is_file():
        valid = choices(group)
        close = difflib.get_close_matches(choice, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown {group} '{choice}'. Valid choices: {', '.join(valid)}{hint}")
    return OmegaConf.load(path) or OmegaConf.create()


def _check_keys(schema: DictConfig, overrides: DictConfig, where: str) -> None:
    """Every key in `overrides` must exist in `schema`; else name it and the nearest valid key."""
    for key, value in overrides.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in schema:
            valid = [str(k) for k in schema.keys()]
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{(where + '.' if where else '') + close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}. Valid keys here: {', '.join(valid)}")
        child = schema._get_node(key)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict and isinstance(value, DictConfig):
            _check_keys(child, value, full)


def _merge(cfg: DictConfig, overrides: DictConfig, source: str) -> None:
    _check_keys(cfg, overrides, "")
    try:
        cfg.merge_with(overrides)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' ({source}): {msg}") from None


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split `key=value` tokens into group picks and dotted overrides (aliases expanded)."""
    picks: dict[str, str] = {}
    dotted: list[tuple[str, str]] = []
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{token}' (see --help)")
        key = key.strip()
        if key in GROUPS:
            picks[key] = value
        elif key in ALIASES:
            dotted.append((ALIASES[key], value))
        else:
            dotted.append((key, value))
    return picks, dotted


def compose(argv: list[str] | None = None) -> DictConfig:
    """The resolved run config for a command line such as ['mixer=attention', 'experts=4']."""
    picks, dotted = split_argv(list(argv or []))
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    defaults = dict(base.pop("defaults", {}))
    experiment = None
    if "experiment" in picks or "experiment" in defaults:
        experiment = _load_group_file("experiment", picks.get("experiment", defaults.get("experiment")))
        defaults.update(dict(experiment.pop("defaults", {})))
    defaults.update(picks)

    files = {g: _load_group_file(g, defaults[g]) for g in ("mixer", "router", "model", "data", "trainer") if g in defaults}
    mixer_name = files.get("mixer", {}).get("name", defaults.get("mixer", "mamba"))
    router_name = files.get("router", {}).get("name", defaults.get("router", "sinkhorn"))
    try:
        cfg = OmegaConf.structured(RunConfig)
        cfg.mixer = _named_node(MIXERS, mixer_name, "mixer")
        cfg.router = _named_node(ROUTERS, router_name, "router")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.moe = OmegaConf.structured(MoENode)
    _merge(cfg, base, "conf/config.yaml")
    for group in NODE_GROUPS:
        if group in files:
            _merge(cfg, OmegaConf.create({group: files[group]}), f"conf/{group}/{defaults[group]}.yaml")
    if "model" in files:
        _merge(cfg, files["model"], f"conf/model/{defaults['model']}.yaml")
    if experiment is not None:
        _merge(cfg, experiment, "experiment file")
    _apply_dotted(cfg, dotted)
    if cfg.resume:
        cfg = _resumed(cfg, picks, dotted)
    return cfg


def _apply_dotted(cfg: DictConfig, dotted: list[tuple[str, str]]) -> None:
    for key, raw in dotted:
        if key.split(".")[0] in ("mixer", "router") and key.endswith(".name"):
            raise ConfigError(f"pick a {key.split('.')[0]} with {key.split('.')[0]}=<name>, not {key}")
        _merge(cfg, OmegaConf.from_dotlist([f"{key}={raw}"]), "command line")


def _resumed(cfg: DictConfig, picks: dict[str, str], dotted: list[tuple[str, str]]) -> DictConfig:
    """A resumed run continues its saved config; only dotted overrides (e.g. trainer.max_steps) apply on top."""
    run_dir = find_run_dir(cfg.out_dir, cfg.resume)
    if picks:
        raise ConfigError(f"resume continues a run with its saved config; drop the group picks {', '.join(picks)}")
    saved = OmegaConf.load(run_dir / "config.yaml")
    resumed = OmegaConf.structured(RunConfig)
    resumed.mixer = _named_node(MIXERS, saved.mixer.name, "mixer")
    resumed.router = _named_node(ROUTERS, saved.router.name, "router")
    resumed.moe = OmegaConf.structured(MoENode)
    _merge(resumed, saved, f"{run_dir}/config.yaml")
    _apply_dotted(resumed, dotted)
    resumed.resume = run_dir.name
    return resumed


def help_text() -> str:
    lines = ["usage: python run.py [group=choice ...] [key.path=value ...] [alias=value ...] [--cfg] [--help]", ""]
    lines.append("config groups (conf/<group>/<choice>.yaml):")
    for group in GROUPS:
        lines.append(f"  {group:<11} {', '.join(choices(group))}")
    lines.append("")
    lines.append("aliases:")
    for alias, key in ALIASES.items():
        lines.append(f"  {alias:<11} -> {key}")
    lines.append("")
    lines.append("sections: " + ", ".join(f.name for f in dataclasses.fields(RunConfig)))
    lines.append("--cfg prints the resolved config and exits. Examples:")
    lines.append("  python run.py mixer=mamba router=sinkhorn experts=8")
    lines.append("  python run.py experiment=blackmamba_small trainer.max_steps=2000")
    return "\n".join(lines)
