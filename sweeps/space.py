"""Search spaces: the `params:` block of conf/sweep/*.yaml, its checks, and trial -> run.py overrides.

    params:                                   # sampled in this order
      moe.top_k: {type: int, low: 1, high: 2}
      moe.num_experts: {type: int, low: 2, high: 64, log: true}
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      router: {type: categorical, choices: [top1, sinkhorn]}           # a group pick, like router=top1
      router.temperature: {type: float, low: 0.1, high: 2, log: true, when: {router: sinkhorn}}
      family:                                                           # named bundles of overrides
        type: categorical
        choices: {mamba: {model.mlp: mlp}, blackmamba: {model.mlp: moe}}
      granularity: {type: categorical, choices: [1, 2, 4], transform: granularity}

A parameter's name is the run.py key it sets (a dotted key, an alias or a group), unless its choices are
named bundles (each sets several keys) or it has a `transform` (a named rule in TRANSFORMS that turns the
value into overrides computed from the config so far). `when: {param: value or [values]}` samples a
parameter only when earlier parameters took those values. `step` makes int/float ranges discrete.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from blocks.registry import lookup
from experiments.build import build_model
from experiments.config import ALIASES, GROUPS, ConfigError, choices, compose


def granularity(g: int, cfg: DictConfig) -> dict[str, Any]:
    """Fine-grained experts (Krajewski et al. 2024): g times as many experts, each 1/g as wide, and g times
    the top_k, so total and active expert parameters stay the same."""
    ffn = cfg.moe.ffn_dim or cfg.model.ffn_dim
    if g < 1 or ffn % g:
        raise ConfigError(f"granularity {g} must be >= 1 and divide the expert ffn width {ffn}")
    return {"moe.ffn_dim": ffn // g, "moe.num_experts": cfg.moe.num_experts * g, "moe.top_k": cfg.moe.top_k * g}


TRANSFORMS: dict[str, Callable[[Any, DictConfig], dict[str, Any]]] = {"granularity": granularity}
_SKIP = object()  # a `pick` result: leave this parameter out
PARAM_KEYS = {
    "int": {"type", "low", "high", "step", "log", "when", "transform"},
    "float": {"type", "low", "high", "step", "log", "when", "transform"},
    "categorical": {"type", "choices", "when", "transform"},
}


def format_value(value: Any) -> str:
    """A value as a run.py command-line token would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def short_params(params: dict[str, Any]) -> str:
    """Trial params for a progress line: floats to 4 significant digits (commands keep them exact)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={format_value(v)}" for k, v in params.items())


@dataclass(frozen=True)
class Param:
    """One searched parameter (see the module docstring for the YAML it comes from)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    bundles: dict[str, dict[str, Any]] | None = None
    transform: str | None = None
    when: dict[str, tuple] = field(default_factory=dict)

    def active(self, values: dict[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def probes(self) -> list[Any]:
        """The values the start-up check composes: both ends of a range, every choice."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def overrides(self, value: Any, argv: list[str]) -> list[str]:
        """run.py tokens for `value`; `argv` (the overrides so far) is what a transform reads."""
        if self.bundles is not None:
            pairs = self.bundles[value].items()
        elif self.transform is not None:
            pairs = TRANSFORMS[self.transform](value, compose(argv)).items()
        else:
            pairs = [(self.name, value)]
        return [f"{k}={format_value(v)}" for k, v in pairs]


def parse_params(raw: Any, where: str) -> list[Param]:
    """Params from the YAML `params:` mapping; a format error raises ConfigError naming the parameter."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: `params:` must be a non-empty mapping of parameter -> spec")
    params: list[Param] = []
    for name, spec in raw.items():
        params.append(_parse_param(str(name), spec, f"{where}: parameter '{name}'", {p.name: p for p in params}))
    return params


def _parse_param(name: str, spec: Any, where: str, earlier: dict[str, Param]) -> Param:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: give a mapping with `type:` (int, float or categorical)")
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        raise ConfigError(f"{where}: unknown type '{kind}'. Valid types: {', '.join(PARAM_KEYS)}")
    for key in spec:
        if key not in PARAM_KEYS[kind]:
            close = difflib.get_close_matches(str(key), sorted(PARAM_KEYS[kind]), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            valid = ", ".join(sorted(PARAM_KEYS[kind]))
            raise ConfigError(f"{where}: unknown key '{key}'{hint}. Valid keys for {kind}: {valid}")
    if not isinstance(spec.get("when") or {}, dict):
        raise ConfigError(f"{where}: `when:` must be a mapping of earlier parameter -> value or [values]")
    when = {}
    for other, allowed in (spec.get("when") or {}).items():
        if other not in earlier:
            raise ConfigError(f"{where}: `when:` names '{other}', which is not a parameter listed before it")
        when[other] = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        bad = [v for v in when[other] if earlier[other].type == "categorical" and v not in earlier[other].choices]
        if bad or not when[other]:
            raise ConfigError(f"{where}: `when: {{{other}: ...}}` needs values among {other}'s choices, "
                              f"got {bad or 'none'}")
    transform = spec.get("transform")
    if transform is not None:
        try:
            lookup(TRANSFORMS, transform, "transform")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if kind == "categorical":
        raw = spec.get("choices")
        if not raw or not isinstance(raw, (list, dict)):
            raise ConfigError(f"{where}: `choices:` must be a non-empty list, or a mapping name -> overrides")
        bundles = None
        if isinstance(raw, dict):
            if not all(isinstance(v, dict) for v in raw.values()):
                raise ConfigError(f"{where}: each named choice must be a mapping of run.py key -> value")
            bundles = {str(k): dict(v) for k, v in raw.items()}
        return Param(name, kind, choices=tuple(bundles or raw), bundles=bundles, transform=transform, when=when)
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    numbers = (int,) if kind == "int" else (int, float)
    for key, value in (("low", low), ("high", high), ("step", step)):
        if (value is not None or key != "step") and (isinstance(value, bool) or not isinstance(value, numbers)):
            what = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{where}: `{key}:` must be {what}, got {value!r}")
    if low > high:
        raise ConfigError(f"{where}: empty range: low {low} > high {high}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low}")
    if log and step not in (None, 1):
        raise ConfigError(f"{where}: `step:` and `log: true` cannot be combined")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: `step:` must be > 0, got {step}")
    return Param(name, kind, float(low), float(high), step, log, transform=transform, when=when)


def trial_overrides(params: list[Param], pick: Callable[[Param], Any], argv: list[str]) -> tuple[dict, list[str]]:
    """(values, run.py overrides) for one trial: `pick` gives each active parameter's value (a trial's
    suggestion, or a fixed value); a parameter whose `when:` does not hold is left out."""
    values: dict[str, Any] = {}
    overrides: list[str] = []
    for p in params:
        if not p.active(values):
            continue
        value = pick(p)
        if value is _SKIP:
            continue
        values[p.name] = value
        overrides += p.overrides(value, argv + overrides)
    return values, overrides


def target_keys(params: list[Param]) -> set[str]:
    """The config keys that a plain parameter sets (aliases expanded; group picks as their group name)."""
    return {ALIASES.get(p.name, p.name) for p in params if p.bundles is None and p.transform is None}


def check_params(params: list[Param], argv: list[str], where: str) -> None:
    """Compose (and build, on the meta device) a config for each end of every range and every choice, each
    with the earlier values its `when:` needs, so that an unknown key or a bad value fails before any trial."""
    by_name = {p.name: p for p in params}
    for p in params:
        if p.name in GROUPS and p.bundles is None and p.transform is None:
            bad = [str(c) for c in p.choices if str(c) not in choices(p.name)]
            if p.type != "categorical" or bad:
                unknown = f"; unknown: {', '.join(bad)}" if bad else ""
                raise ConfigError(f"{where}: parameter '{p.name}' picks conf/{p.name}/<choice>.yaml: give categorical "
                                  f"choices among {', '.join(choices(p.name))}{unknown}")
        for value in p.probes():
            fixed = {p.name: value}
            _add_conditions(p, fixed, by_name)
            try:
                _, overrides = trial_overrides(params, lambda q: fixed.get(q.name, _SKIP), argv)
                cfg = compose(argv + overrides)
                with torch.device("meta"):
                    build_model(cfg, cfg.model.vocab_size or 256)
            except ValueError as e:
                raise ConfigError(f"{where}: parameter '{p.name}' = {format_value(value)}: {e}") from None


def _add_conditions(p: Param, fixed: dict[str, Any], by_name: dict[str, Param]) -> None:
    for other, allowed in p.when.items():
        if other not in fixed:
            fixed[other] = allowed[0]
            _add_conditions(by_name[other], fixed, by_name)


def grid_space(params: list[Param], where: str) -> dict[str, list]:
    """GridSampler's search space: every parameter must be categorical and unconditional."""
    for p in params:
        if p.type != "categorical" or p.when:
            raise ConfigError(f"{where}: sampler=grid needs unconditional categorical parameters; '{p.name}' is not")
    return {p.name: list(p.choices) for p in params}
