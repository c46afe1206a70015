"""Name -> (config dataclass, module class) registries, with errors that name the valid choices."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any


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
