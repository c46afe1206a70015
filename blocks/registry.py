"""Name -> (config dataclass, module class) registries, with errors that name the valid choices."""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # a name is also a config group choice


def lookup(registry: dict[str, Any], name: str, kind: str) -> Any:
    """registry[name], or a ValueError listing the valid names (and the closest one)."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(str(name), list(registry), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown {kind} '{name}'. Valid choices: {', '.join(sorted(registry))}{hint}")


def make_config(cls: type, values: Any, kind: str) -> Any:
    """Build dataclass `cls` from None (defaults), an instance, or a mapping of field values.

    Unknown keys raise ValueError naming the key, the closest valid key and all valid keys.
    """
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if dataclasses.is_dataclass(values) or not hasattr(values, "keys"):
        raise ValueError(f"{kind} takes a {cls.__name__} or a dict, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    values = dict(values)
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {kind} option '{key}'{hint}. Valid options: {', '.join(names)}")
    return cls(**values)


def register(registry: dict[str, tuple[type, type]], name: str, cfg_cls: type, cls: type, base: type, kind: str) -> None:
    """Add `name -> (cfg_cls, cls)` to `registry`: cls must subclass `base`, cfg_cls be a dataclass without a
    `name` field (the run config adds one). A name already taken raises ValueError naming its owner, so a
    plug-in can neither replace a built-in nor another plug-in; registering the same pair again does nothing."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} must be letters, digits, '_' or '-', starting with a letter or '_'")
    if not (isinstance(cfg_cls, type) and dataclasses.is_dataclass(cfg_cls)):
        raise ValueError(f"{kind} '{name}': its config must be a dataclass, got {cfg_cls!r}")
    if "name" in {f.name for f in dataclasses.fields(cfg_cls)}:
        raise ValueError(f"{kind} '{name}': {cfg_cls.__name__} must not have a field called 'name' (the run config adds it)")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{kind} '{name}': {cls!r} must be a subclass of {base.__module__}.{base.__qualname__}")
    if name in registry and registry[name] != (cfg_cls, cls):
        owner = registry[name][1]
        raise ValueError(f"{kind} '{name}' is already registered by {owner.__module__}.{owner.__qualname__}; pick another name")
    registry[name] = (cfg_cls, cls)
