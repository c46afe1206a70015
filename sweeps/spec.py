"""A sweep file (conf/sweep/<name>.yaml, or any YAML path) and the sweep keys of the command line.

    description: one line for `python sweep.py --help`
    overrides: [router=sinkhorn]          # run.py overrides every trial starts from (before the command line's)
    objectives: [val/bpb]                 # 2+ metrics make a multi-objective study with a Pareto front
    sampler: tpe                          # see sweeps.samplers; a mapping {name: .., option: ..} sets options
    pruner: median
    budget: {tokens: 2.0e6}               # see sweeps.budget
    n_trials: 20                          # trials one command adds (a grid: its remaining points)
    params: {...}                         # see sweeps.space

On the command line, `objectives=val/bpb,params_active`, `sampler=gp`, `sampler.seed=0`, `pruner=hyperband`,
`pruner.reduction_factor=2` and `budget.flops=1e15` replace what the file says (a budget kind given on the
line replaces the file's kind).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from experiments.config import CONF_DIR, ConfigError, load_yaml
from sweeps import budget as budgets
from sweeps.space import Param, parse_params

SWEEP_DIR = CONF_DIR / "sweep"
FILE_KEYS = ("description", "overrides", "objectives", "sampler", "pruner", "budget", "n_trials", "params")
# metric -> direction; val/* come from the last validation, params_* and FLOPs from blocks.accounting
OBJECTIVES = {
    "val/bpb": "minimize",
    "val/loss": "minimize",
    "val/bits_per_token": "minimize",
    "train/loss": "minimize",
    "train/tokens_per_s": "maximize",
    "params_active": "minimize",
    "params_total": "minimize",
    "train_flops_per_token": "minimize",
}


@dataclass
class SweepSpec:
    name: str
    description: str
    overrides: list[str]
    objectives: list[str]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    budget: dict[str, Any]
    n_trials: int | None
    params: list[Param]
    note: str = ""  # why the file's pruner was set aside, if it was

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[m] for m in self.objectives]


def sweep_names() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def _named(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise ConfigError(f"{where} must be a name or a mapping with `name:`, got {value!r}")


def load_sweep(name: str) -> SweepSpec:
    """The sweep `name` (conf/sweep/<name>.yaml) or the YAML file at path `name`."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SWEEP_DIR / f"{name}.yaml"
    if not path.is_file():
        if path.parent != SWEEP_DIR:
            raise ConfigError(f"sweep file {path} does not exist")
        close = difflib.get_close_matches(name, sweep_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown sweep '{name}'. Valid sweeps: {', '.join(sweep_names())}{hint}")
    raw = OmegaConf.to_container(load_yaml(path)) or {}
    where = f"sweep '{path.stem}'"
    for key in raw:
        if key not in FILE_KEYS:
            close = difflib.get_close_matches(str(key), FILE_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}. Valid keys: {', '.join(FILE_KEYS)}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{where}: `overrides:` must be a list of run.py key=value strings")
    objectives = raw.get("objectives") or ["val/bpb"]
    n_trials = raw.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 0):
        raise ConfigError(f"{where}: n_trials must be an integer >= 0, got {n_trials!r}")
    return SweepSpec(
        name=path.stem,
        description=str(raw.get("description", "")),
        overrides=overrides,
        objectives=[objectives] if isinstance(objectives, str) else list(objectives),
        sampler=_named(raw.get("sampler", "tpe"), f"{where}: sampler"),
        pruner=_named(raw.get("pruner", "median"), f"{where}: pruner"),
        budget=dict(raw.get("budget") or {}),
        n_trials=n_trials,
        params=parse_params(raw.get("params"), where),
    )


def parse_value(text: str) -> Any:
    """A command-line value: int, float, true/false/null, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def with_keys(spec: SweepSpec, keys: dict[str, str]) -> SweepSpec:
    """`spec` with the command line's sweep keys applied, then checked as a whole."""
    sampler, pruner, budget = dict(spec.sampler), dict(spec.pruner), dict(spec.budget)
    objectives = spec.objectives
    if "objectives" in keys:
        objectives = [m.strip() for m in keys["objectives"].split(",") if m.strip()]
    for node, name in ((sampler, "sampler"), (pruner, "pruner")):
        if name in keys and keys[name] != node["name"]:
            node.clear()  # the file's options belong to the file's choice
            node["name"] = keys[name]
    if any(k.startswith("budget.") and k[7:] in budgets.KINDS for k in keys):
        budget = {k: v for k, v in budget.items() if k not in budgets.KINDS}
    for key, value in keys.items():
        head, _, option = key.partition(".")
        node = {"sampler": sampler, "pruner": pruner, "budget": budget}.get(head)
        if node is not None and option:
            node[option] = parse_value(value)
    spec = dataclasses.replace(spec, objectives=objectives, sampler=sampler, pruner=pruner, budget=budget)
    _check(spec, explicit_pruner="pruner" in keys)
    return spec


def _check(spec: SweepSpec, explicit_pruner: bool) -> None:
    if not spec.objectives or len(set(spec.objectives)) != len(spec.objectives):
        raise ConfigError(f"objectives must be distinct metrics, got {spec.objectives}")
    for metric in spec.objectives:
        if metric not in OBJECTIVES:
            close = difflib.get_close_matches(metric, list(OBJECTIVES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown objective '{metric}'{hint}. Valid objectives: {', '.join(OBJECTIVES)}")
    if spec.pruner["name"] != "none":
        why = ("pruning needs a single objective" if len(spec.objectives) > 1 else
               "pruning needs a validation objective (val/...)" if not spec.objectives[0].startswith("val/") else "")
        if why and explicit_pruner:
            raise ConfigError(f"pruner={spec.pruner['name']}: {why}; use pruner=none")
        if why:
            spec.pruner = {"name": "none"}
            spec.note = f"pruner: none ({why})"
