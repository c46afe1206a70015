"""Plug-ins: a mixer or router in the researcher's own Python file, selected by name like a built-in one.

    python run.py --plugin my_router.py router=my_router router.noise_std=0.5
    BLACKMAMBA_PLUGINS=my_router.py:my_mixer.py python sweep.py sweep=routers ...

A plug-in file registers its classes with `routers.register_router(name, ConfigDataclass)` or
`blocks.register_mixer(name, ConfigDataclass)` (class decorators). An optional `<name>.yaml` next to the file is
that choice's group file, as conf/router/<name>.yaml is for a built-in one. Plug-ins are loaded only from the
command line (--plugin FILE, repeatable) and the BLACKMAMBA_PLUGINS environment variable (files separated by
os.pathsep), never from a config file: a config is data and cannot import code. A run's config records the
chosen name, so resuming a plug-in run, or generating from its checkpoint, needs the same plug-in again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from blocks import MIXERS
from routers import ROUTERS

PLUGIN_ENV = "BLACKMAMBA_PLUGINS"
RECORD_FILE = "plugins.json"  # beside a run's config.yaml: the plug-ins it was trained with
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
REGISTRIES = {"mixer": MIXERS, "router": ROUTERS}
_loaded: dict[Path, list[tuple[str, str]]] = {}  # plug-in file -> the (group, name) pairs it registered
_group_files: dict[tuple[str, str], Path] = {}  # (group, name) -> <plug-in dir>/<name>.yaml


class PluginError(ValueError):
    """A plug-in file that cannot be found, fails to import, or registers nothing."""


def load_plugin(path: str | Path) -> list[tuple[str, str]]:
    """Import one plug-in file (once per process) and return the (group, name) pairs it registered."""
    path = Path(path).expanduser().resolve()
    if path in _loaded:
        return _loaded[path]
    if path.suffix != ".py" or not path.is_file():
        raise PluginError(f"plug-in {path}: no such Python file")
    before = {group: set(registry) for group, registry in REGISTRIES.items()}
    module_name = f"blackmamba_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and OmegaConf resolve the config's annotations through it
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        for group, registry in REGISTRIES.items():  # undo a partial registration
            for name in set(registry) - before[group]:
                del registry[name]
        raise PluginError(f"plug-in {path} failed to load: {type(e).__name__}: {e}") from e
    added = [(group, name) for group, registry in REGISTRIES.items() for name in registry if name not in before[group]]
    if not added:
        raise PluginError(f"plug-in {path} registered no mixer or router "
                          "(decorate a class with routers.register_router or blocks.register_mixer)")
    _refuse_built_in_choices(path, added)
    for group, name in added:
        yaml = path.with_name(f"{name}.yaml")
        if yaml.is_file():
            _group_files[(group, name)] = yaml
    _loaded[path] = added
    return added


def _refuse_built_in_choices(path: Path, added: list[tuple[str, str]]) -> None:
    """A plug-in name must not be a built-in group choice either (conf/router/aux_free.yaml is one without being
    a registry name): `router=<name>` would load the built-in file. Undo the registration and say so."""
    taken = [(group, name) for group, name in added if (CONF_DIR / group / f"{name}.yaml").is_file()]
    if not taken:
        return
    for group, name in added:
        del REGISTRIES[group][name]
    group, name = taken[0]
    raise PluginError(f"plug-in {path}: {group} '{name}' is a built-in choice (conf/{group}/{name}.yaml); "
                      "pick another name")


def plugin_paths(argv_paths: list[str] = ()) -> list[str]:
    """The plug-in files of this process: $BLACKMAMBA_PLUGINS first, then those named on the command line."""
    env = [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p.strip()]
    return env + [p for p in argv_paths if p not in env]


def load_plugins(argv_paths: list[str] = ()) -> list[tuple[str, str]]:
    """Load every plug-in of `plugin_paths(argv_paths)` and export the full list in $BLACKMAMBA_PLUGINS, so
    that worker processes (a sweep's n_jobs, spawned data loaders) load the same ones."""
    paths = plugin_paths(argv_paths)
    added = [entry for p in paths for entry in load_plugin(p)]
    if paths:
        os.environ[PLUGIN_ENV] = os.pathsep.join(str(Path(p).expanduser().resolve()) for p in paths)
    return added


def split_plugin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(plug-in files, the other arguments) from a command line with `--plugin FILE` or `--plugin=FILE`."""
    paths, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--plugin":
            path = next(it, None)
            if path is None or path.startswith("-"):
                raise PluginError("--plugin needs a Python file: --plugin my_router.py")
            paths.append(path)
        elif arg.startswith("--plugin="):
            paths.append(arg.partition("=")[2])
        else:
            rest.append(arg)
    return paths, rest


def group_file(group: str, name: str) -> Path | None:
    """The group file a loaded plug-in brings for `group=name` (its <name>.yaml), if any."""
    return _group_files.get((group, name))


def plugin_choices(group: str) -> list[str]:
    """The names loaded plug-ins registered in `group`."""
    return sorted(name for entries in _loaded.values() for g, name in entries if g == group)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plugin_record() -> list[dict]:
    """The plug-ins loaded in this process: file, SHA-256 of its bytes now, and the `group:name`s it registered."""
    return [{"path": str(path), "sha256": sha256(path), "registers": [f"{g}:{n}" for g, n in entries]}
            for path, entries in _loaded.items()]


def record_plugins(run_dir: Path, client=None, run_id: str | None = None) -> list[dict]:
    """Record the loaded plug-ins of a run: <run_dir>/plugins.json (read back when the run is resumed or its
    checkpoint loaded without them) and the MLflow tag `plugins` (files and their SHA-256). Nothing without any."""
    record = plugin_record()
    if not record:
        return record
    (Path(run_dir) / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if client is not None and run_id:
        client.set_tag(run_id, "plugins", "; ".join(f"{e['path']} (sha256 {e['sha256']})" for e in record))
    return record


def read_record(run_dir: Path | None) -> list[dict]:
    """A run's plugins.json ([] when it has none or it cannot be read: the record only serves messages)."""
    path = Path(run_dir) / RECORD_FILE if run_dir is not None else None
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else []
    except (OSError, ValueError):
        return []
    return [e for e in record if isinstance(e, dict)] if isinstance(record, list) else []


def missing_plugin_hint(run_dir: Path | None, group: str, name: str) -> str:
    """What to do about `group=name` not being registered, for a run dir (or a checkpoint's run dir) that
    needs it: the plug-in file it was trained with, when its plugins.json says so."""
    for entry in read_record(run_dir):
        if f"{group}:{name}" in entry.get("registers", []):
            path = Path(str(entry.get("path", "")))
            state = "" if path.is_file() else " (that file is gone: give the same code from where it is now)"
            return (f"{group} '{name}' comes from the plug-in {path} (sha256 {str(entry.get('sha256', '?'))[:16]}...) "
                    f"the run was trained with; load it with --plugin {path}{state}")
    return f"if {group} '{name}' comes from a plug-in, load its file with --plugin FILE (or ${PLUGIN_ENV})"


def check_recorded(run_dir: Path) -> list[str]:
    """Notes on plug-ins a run was trained with whose files changed since (a different SHA-256)."""
    notes = []
    for entry in read_record(run_dir):
        file = Path(str(entry.get("path", "")))
        if file.is_file() and file.resolve() in _loaded and sha256(file) != entry.get("sha256"):
            notes.append(f"note: plug-in {file} changed since the run was trained with it (sha256 differs)")
    return notes
