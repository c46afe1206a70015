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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blocks import MIXERS
from blocks.model import ModelConfig
from blocks.moe import MoEConfig
from blocks.registry import NAME_PATTERN, lookup
from experiments import plugins
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


RUNS_KEY = "runs"  # in an experiment file: arm name -> overrides, one run each (experiments/comparison.py)


class ConfigError(ValueError):
    """A user error in the command line or a config file."""


ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64")
STRATEGIES = ("auto", "ddp", "fsdp")  # Lightning's; docs/distributed.md


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class TrainerConfig:
    max_steps: int = 600  # optimizer steps; also the length of the cosine schedule
    val_every: int = 100  # validate (and checkpoint) every this many steps
    log_every: int = 10
    accelerator: str = "auto"  # auto: cuda when available, else cpu
    devices: int = 1  # processes per node (one per GPU); > 1 runs data-parallel
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP: one unit per block); auto is DDP for several processes
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true on CPU
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    compile: bool = False  # torch.compile the model
    # forward, loss and backward of each training step replayed from one CUDA graph after a few eager steps
    # (experiments/train_graph.py): one GPU, fixed batch shape, no gradient accumulation
    cuda_graph: bool = False
    stop_at_step: int | None = None  # end this invocation early (with a checkpoint); resume continues it
    progress_bar: bool = True
    # A step whose loss or gradients are not finite is skipped (no update; the step counter and schedule go on);
    # this many in a row stop the run with a checkpoint and a message. 1: stop at the first.
    nonfinite_stop_after: int = 3

    def __post_init__(self) -> None:
        for key in ("max_steps", "val_every", "log_every", "devices", "num_nodes", "accumulate_grad_batches",
                    "nonfinite_stop_after"):
            _check(getattr(self, key) >= 1, f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        _check(self.accelerator in ACCELERATORS,
               f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got '{self.accelerator}'")
        _check(self.strategy in STRATEGIES,
               f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        _check(self.precision in PRECISIONS,
               f"trainer.precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        _check(math.isfinite(self.grad_clip) and self.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        _check(self.stop_at_step is None or self.stop_at_step >= 1, f"trainer.stop_at_step must be >= 1, got {self.stop_at_step}")
        if self.cuda_graph:
            why = ("trainer.cuda_graph=true replays one GPU's whole fwd+bwd from a CUDA graph, which {}; "
                   "set trainer.cuda_graph=false")
            _check(self.accelerator in ("auto", "cuda", "gpu"), why.format(f"needs a CUDA GPU, not trainer.accelerator={self.accelerator}"))
            _check(self.devices * self.num_nodes == 1, why.format(
                "does not run under several processes (their gradient reductions hook into the backward)"))
            _check(self.accumulate_grad_batches == 1, why.format(
                "writes each step's whole gradient and cannot add micro-batches (trainer.accumulate_grad_batches=1)"))
            _check(not self.compile, why.format("is not combined with trainer.compile=true"))


OPTIM_IMPLS = ("auto", "fused", "foreach")
FUSED_WITH_SCALER = ("optim.impl=fused cannot run with trainer.precision=16-mixed: its GradScaler must unscale the "
                     "gradients before they are clipped, and fused AdamW unscales inside its step; use "
                     "optim.impl=foreach (or auto), or trainer.precision=bf16-mixed")


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    # AdamW's implementation: fused (one kernel per step), foreach (multi-tensor kernels), or auto: fused
    # when every weight is on a GPU and no GradScaler (trainer.precision=16-mixed) has to unscale first
    impl: str = "auto"
    # keep the weights in bf16 and AdamW's update on fp32 copies of them (experiments/master_adamw.py): the
    # forward and backward then cast no weight; with trainer.precision=bf16-mixed (auto on a GPU) only
    master_weights: bool = False

    def __post_init__(self) -> None:
        _check(self.impl in OPTIM_IMPLS, f"optim.impl must be one of {', '.join(OPTIM_IMPLS)}, got '{self.impl}'")
        for key in ("lr", "weight_decay", "eps"):
            value = getattr(self, key)
            _check(math.isfinite(value) and value >= 0, f"optim.{key} must be a finite number >= 0, got {value}")
        for key in ("beta1", "beta2"):
            _check(0 <= getattr(self, key) < 1, f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def check_master_weights(precision: str, accumulate: int, strategy: str) -> None:
    """optim.master_weights=true: what it runs with (precision "auto" is checked again once resolved)."""
    why = "optim.master_weights=true keeps bf16 weights with fp32 masters in AdamW, {}; or set optim.master_weights=false"
    _check(precision in ("auto", "bf16-mixed"), why.format(
        f"under trainer.precision=bf16-mixed (auto on a GPU), not trainer.precision={precision}"))
    _check(accumulate == 1, why.format("and would add micro-batch gradients in bf16: use "
                                       f"trainer.accumulate_grad_batches=1, not {accumulate}"))
    _check(strategy != "fsdp", why.format("which FSDP's own mixed precision does instead: use trainer.strategy=auto "
                                          "or ddp"))


@dataclass
class TrackingConfig:
    experiment: str = "blackmamba"  # MLflow experiment name
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    run_name: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment must not be empty")


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

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        _check(bool(self.out_dir.strip()), "out_dir must not be empty")
        _check(not (self.optim.impl == "fused" and self.trainer.precision == "16-mixed"), FUSED_WITH_SCALER)
        if self.optim.master_weights:
            check_master_weights(self.trainer.precision, self.trainer.accumulate_grad_batches, self.trainer.strategy)
        if self.moe is not None and self.moe.expert_parallel != 1:  # the rest is checked with the world size
            ep, experts = self.moe.expert_parallel, self.moe.num_experts * self.moe.granularity
            _check(ep >= 1 and experts % ep == 0, f"moe.expert_parallel={ep} must be >= 1 and divide the number of "
                   f"experts {experts} (moe.num_experts x moe.granularity): each rank holds an equal share")
            world = self.trainer.devices * self.trainer.num_nodes
            _check(world % ep == 0, f"moe.expert_parallel={ep} must divide the number of processes {world} "
                   f"(trainer.devices={self.trainer.devices} x trainer.num_nodes={self.trainer.num_nodes})")
            _check(self.trainer.strategy != "fsdp", "moe.expert_parallel > 1 works with trainer.strategy=ddp "
                   "(or auto), not fsdp")


def _named_node(registry: dict, name: str, kind: str) -> DictConfig:
    """A structured node for registry[name]'s config dataclass with an extra `name` field."""
    cfg_cls = lookup(registry, name, kind)[0]
    node_cls = dataclasses.make_dataclass(f"{cfg_cls.__name__}Node", [("name", str, field(default=name))], bases=(cfg_cls,))
    return OmegaConf.structured(node_cls)


def choices(group: str) -> list[str]:
    """conf/<group>/'s files, and the names loaded plug-ins registered in the group."""
    return sorted({p.stem for p in (CONF_DIR / group).glob("*.yaml")} | set(plugins.plugin_choices(group)))


def load_yaml(path: Path) -> DictConfig:
    """A YAML file as a config: plain data only (OmegaConf's safe loader refuses python/* tags)."""
    try:
        loaded = OmegaConf.load(path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # YAML syntax, a python/* tag
        raise ConfigError(f"{path} is not a valid config file: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys, not a {type(loaded).__name__}")
    return loaded


def _load_group_file(group: str, choice: str) -> DictConfig:
    valid = choices(group)
    if choice not in valid:  # a name, never a path: conf/<group>/ holds the only choices
        close = difflib.get_close_matches(choice, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown {group} '{choice}'. Valid choices: {', '.join(valid)}{hint}")
    if (CONF_DIR / group / f"{choice}.yaml").is_file():
        return load_yaml(CONF_DIR / group / f"{choice}.yaml")
    own = plugins.group_file(group, choice)  # a plug-in's <name>.yaml beside it, or only its dataclass defaults
    return load_yaml(own) if own else OmegaConf.create({})


def _check_keys(schema: DictConfig, overrides: DictConfig, where: str) -> None:
    """Every key in `overrides` must exist in `schema`; else name it and the nearest valid key."""
    for key, value in overrides.items_ex(resolve=False):
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
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{token}' (see --help)")
        if key in GROUPS:
            picks[key] = value
        elif key in ALIASES:
            dotted.append((ALIASES[key], value))
        else:
            dotted.append((key, value))
    return picks, dotted


def experiment_runs(argv: list[str]) -> dict[str, list[str]]:
    """The arms of the multi-run experiment that argv picks (its `runs:` mapping: arm name -> overrides), or
    {} when the experiment picked (if any) is an ordinary one."""
    name = split_argv(list(argv))[0].get("experiment")
    return _runs(name, _load_group_file("experiment", name)) if name else {}


def _runs(name: str, experiment: DictConfig) -> dict[str, list[str]]:
    """An experiment file's `runs:` ({} without one), checked: arm names, and key=value overrides that neither
    pick another experiment nor resume (an arm is one new run)."""
    if RUNS_KEY not in experiment:
        return {}
    runs = OmegaConf.to_container(experiment[RUNS_KEY])
    where = f"conf/experiment/{name}.yaml, runs"
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{where}: must map arm names to lists of overrides (top1: [router=top1])")
    for arm, overrides in runs.items():
        if not (isinstance(arm, str) and NAME_PATTERN.fullmatch(arm)):
            raise ConfigError(f"{where}: arm name {arm!r} must be letters, digits, '_' or '-'")
        if not (isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides)):
            raise ConfigError(f"{where}.{arm}: must be a list of key=value overrides, got {overrides!r}")
        bad = [o for o in overrides if o.partition("=")[0].strip() in ("experiment", "resume")]
        if bad:
            raise ConfigError(f"{where}.{arm}: an arm cannot set '{bad[0]}' (an arm is one new run)")
    return runs


def multi_run_error(name: str, runs: dict[str, list[str]], here: str) -> ConfigError:
    first, overrides = next(iter(runs.items()))
    return ConfigError(f"experiment={name} trains several runs ({', '.join(runs)}): only python run.py "
                       f"experiment={name} runs it; {here}. To use one arm's settings, give its overrides instead "
                       f"(arm {first}: {' '.join(overrides) or 'none'})")


def compose(argv: list[str] | None = None, arm: bool = False) -> DictConfig:
    """The resolved run config for a command line such as ['mixer=attention', 'experts=4']. An experiment with
    `runs:` (several runs) is refused unless `arm` is set: then argv already holds one arm's overrides
    (experiments.comparison composes each arm so) and `runs:` is left out of the config."""
    picks, dotted = split_argv(list(argv or []))
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    defaults = dict(base.pop("defaults", {}))
    experiment = None
    if "experiment" in picks or "experiment" in defaults:
        name = picks.get("experiment", defaults.get("experiment"))
        experiment = _load_group_file("experiment", name)
        runs = _runs(name, experiment)
        if runs and not arm:
            raise multi_run_error(name, runs, "a single run cannot take it")
        experiment.pop(RUNS_KEY, None)
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
    _validate(cfg)
    return cfg


def _apply_dotted(cfg: DictConfig, dotted: list[tuple[str, str]]) -> None:
    for key, raw in dotted:
        if key.split(".")[0] in ("mixer", "router") and key.endswith(".name"):
            raise ConfigError(f"pick a {key.split('.')[0]} with {key.split('.')[0]}=<name>, not {key}")
        try:
            override = OmegaConf.from_dotlist([f"{key}={raw}"])
        except Exception as e:  # a key OmegaConf cannot parse (a.[0], a..b), a value YAML cannot parse
            raise ConfigError(f"cannot parse the override '{key}={raw}': {str(e).splitlines()[0]}") from None
        try:
            _merge(cfg, override, "command line")
        except ConfigError as e:  # OmegaConf may read the key differently from how it was typed: quote both
            if key in str(e):
                raise
            raise ConfigError(f"{e} (in '{key}={raw}')") from None


def _validate(cfg: DictConfig) -> None:
    """Resolve interpolations in place (only OmegaConf's built-in resolvers exist: ${oc.env:VAR} and the like)
    and build every section's dataclass once, so that each range check runs before anything starts."""
    try:
        OmegaConf.resolve(cfg)
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for '{key}': {str(e).splitlines()[0]}") from None
    except ValueError as e:  # a dataclass's own check
        raise ConfigError(str(e).splitlines()[0]) from None


def _resumed(cfg: DictConfig, picks: dict[str, str], dotted: list[tuple[str, str]]) -> DictConfig:
    """A resumed run continues its saved config (but not its trainer.stop_at_step, which ended the invocation
    that set it); only dotted overrides (e.g. trainer.max_steps) apply on top."""
    run_dir = find_run_dir(cfg.out_dir, cfg.resume)
    if picks:
        raise ConfigError(f"resume continues a run with its saved config; drop the group picks {', '.join(picks)}")
    saved = load_yaml(run_dir / "config.yaml")
    resumed = OmegaConf.structured(RunConfig)
    try:
        resumed.mixer = _named_node(MIXERS, OmegaConf.select(saved, "mixer.name", default=""), "mixer")
        resumed.router = _named_node(ROUTERS, OmegaConf.select(saved, "router.name", default=""), "router")
    except (ValueError, OmegaConfBaseException) as e:
        raise ConfigError(f"{run_dir / 'config.yaml'}: {str(e).splitlines()[0]}{_plugin_hint(run_dir, saved)}") from None
    resumed.moe = OmegaConf.structured(MoENode)
    _merge(resumed, saved, f"{run_dir}/config.yaml")
    resumed.trainer.stop_at_step = None  # it ended one invocation; the command line may set a new one
    _apply_dotted(resumed, dotted)
    resumed.resume = run_dir.name
    return resumed


def _plugin_hint(run_dir: Path, saved: DictConfig) -> str:
    """For a saved run whose mixer or router is not registered: the plug-in it was trained with."""
    for group, registry in (("mixer", MIXERS), ("router", ROUTERS)):
        name = OmegaConf.select(saved, f"{group}.name", default=None)
        if isinstance(name, str) and name not in registry:
            return "; " + plugins.missing_plugin_hint(run_dir, group, name)
    return ""


def help_text() -> str:
    lines = ["usage: python run.py [--plugin FILE ...] [group=choice ...] [key.path=value ...] [alias=value ...] "
             "[--cfg] [--runs] [--help]", ""]
    lines.append("config groups (conf/<group>/<choice>.yaml):")
    for group in GROUPS:
        lines.append(f"  {group:<11} {', '.join(choices(group))}")
    lines.append("")
    lines.append("aliases:")
    for alias, key in ALIASES.items():
        lines.append(f"  {alias:<11} -> {key}")
    lines.append("")
    lines.append("sections: " + ", ".join(f.name for f in dataclasses.fields(RunConfig)))
    lines.append("--cfg prints the resolved config and exits; --runs lists the newest runs of the experiment (closing")
    lines.append("those left RUNNING by a process that is gone). Exit codes: 0 done, 1 diverged (non-finite), 2 bad")
    lines.append("input, 130 / 143 stopped by Ctrl-C / SIGTERM (resume=<run id> continues). Examples:")
    lines.append("  python run.py mixer=mamba router=sinkhorn experts=8")
    lines.append("  python run.py experiment=blackmamba_small trainer.max_steps=2000")
    lines.append("  python run.py experiment=router_comparison model=tiny steps=20   # one run per arm, then a report")
    lines.append("  python run.py --plugin my_router.py router=my_router   # a router or mixer from your own file")
    lines.append(f"--plugin FILE (repeatable) or ${plugins.PLUGIN_ENV}=FILE:FILE loads plug-ins (docs/routing.md).")
    return "\n".join(lines)
