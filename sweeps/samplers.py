"""Samplers and pruners chosen by name, with the options a sweep file or the command line may set.

    sampler: tpe                               # or {name: tpe, n_startup_trials: 5}; sampler.seed=0 on the line
    pruner: {name: median, n_startup_trials: 3}

Each name maps to an Optuna class and a literal list of its plain-valued options, so a sweep file can
only choose among these; nothing in it can name code to import.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Any

import optuna
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner
from optuna.samplers import BaseSampler, CmaEsSampler, GPSampler, GridSampler, NSGAIISampler, RandomSampler, TPESampler

from blocks.registry import lookup
from experiments.config import ConfigError

SAMPLERS: dict[str, tuple[type[BaseSampler], tuple[str, ...]]] = {
    "tpe": (TPESampler, ("seed", "n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar")),
    "random": (RandomSampler, ("seed",)),
    "cmaes": (CmaEsSampler, ("seed", "n_startup_trials", "sigma0", "restart_strategy", "popsize", "use_separable_cma",
                             "with_margin", "lr_adapt")),
    "gp": (GPSampler, ("seed", "n_startup_trials", "deterministic_objective")),
    "grid": (GridSampler, ("seed",)),
    "nsga2": (NSGAIISampler, ("seed", "population_size", "mutation_prob", "crossover_prob", "swapping_prob")),
}
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)
PRUNERS: dict[str, tuple[type[BasePruner], tuple[str, ...]]] = {
    "median": (MedianPruner, ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials")),
    "hyperband": (HyperbandPruner, ("min_resource", "max_resource", "reduction_factor", "bootstrap_count")),
    "none": (NopPruner, ()),
}


def _make(registry: dict, spec: dict[str, Any], kind: str, **extra: Any) -> Any:
    name = spec["name"]
    try:
        cls, allowed = lookup(registry, name, kind)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    options = {k: v for k, v in spec.items() if k != "name"}
    for key, value in options.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown option '{key}' for {kind}={name}{hint}. "
                              f"Valid options: {', '.join(allowed) or 'none'}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"{kind}.{key} must be a plain value, got {value!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**options, **extra)
    except ImportError as e:
        raise ConfigError(f"{kind}={name} needs a package that is not installed ({e})") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for {kind}={name}: {e}") from None


def make_sampler(spec: dict[str, Any], grid: dict[str, list] | None, worker: int = 0) -> BaseSampler:
    """The sampler `spec` names; worker k of a parallel study adds k to the seed, so that workers started
    with one seed do not all draw the same points."""
    spec = dict(spec)
    if spec.get("seed") is not None:
        if isinstance(spec["seed"], bool) or not isinstance(spec["seed"], int):
            raise ConfigError(f"sampler.seed must be an integer, got {spec['seed']!r}")
        spec["seed"] += worker
    extra = {"search_space": grid} if spec["name"] == "grid" else {}
    return _make(SAMPLERS, spec, "sampler", **extra)


def make_pruner(spec: dict[str, Any]) -> BasePruner:
    return _make(PRUNERS, spec, "pruner")
