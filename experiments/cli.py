"""Command-line front ends: turn argv into a config, report user errors in one line, no traceback."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from experiments.checkpoint import CheckpointError
from experiments.config import ConfigError, compose, experiment_runs, help_text
from experiments.plugins import PluginError, load_plugins, missing_plugin_hint, split_plugin_args


def one_line(message: object) -> str:
    """A message for one line of the terminal: line breaks and other control characters (which a command
    line can carry into an error message) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def with_plugins(argv: list[str]) -> list[str]:
    """Load the plug-ins of `--plugin FILE` (repeatable) and $BLACKMAMBA_PLUGINS before anything composes a
    config (their names are group choices, their YAML files group files); the rest of argv. Raises
    PluginError for a missing file, one that fails to import, or a name that is taken."""
    paths, rest = split_plugin_args(argv)
    load_plugins(paths)
    return rest


def main_train(argv: list[str]) -> int:
    """run.py: 0 when the run ends, 2 for a bad command line, config, data or checkpoint, 1 when training
    diverged (non-finite loss) or an arm of a multi-run experiment failed, 143 / 130 when SIGTERM / Ctrl-C
    stopped it (with a checkpoint)."""
    try:
        argv = with_plugins(argv)
    except PluginError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    show_cfg, show_runs = "--cfg" in argv, "--runs" in argv
    argv = [a for a in argv if a not in ("--cfg", "--runs")]
    try:
        runs = experiment_runs(argv)
        if runs:
            return _main_comparison(argv, runs, show_cfg, show_runs)
        cfg = compose(argv)
        if show_cfg:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        if show_runs:
            from experiments.tracking import list_runs

            print(list_runs(cfg))
            return 0
        from experiments.train import Interrupted, train  # imported late: --help and --cfg stay fast

        try:
            train(cfg)
        except Interrupted as e:
            print(f"\ninterrupted: {e}", file=sys.stderr)
            return e.exit_code
    except (ConfigError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started: nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def _main_comparison(argv: list[str], runs: dict[str, list[str]], show_cfg: bool, show_runs: bool) -> int:
    """run.py experiment=<one with runs:>: every arm, then one report (experiments.comparison)."""
    from experiments.comparison import arm_configs, run_comparison

    configs = arm_configs(argv, runs)
    if show_cfg:
        print("\n".join(f"# arm {name}\n{OmegaConf.to_yaml(cfg)}" for name, cfg in configs.items()), end="")
        return 0
    if show_runs:
        from experiments.tracking import list_runs

        print(list_runs(next(iter(configs.values()))))
        return 0
    result = run_comparison(argv, runs)
    if result.report:
        print(f"comparison report: {result.report}")
    if result.interrupted:
        never = f"; arms not started: {', '.join(result.not_started)}" if result.not_started else ""
        print(f"\ninterrupted: {result.interrupted}{never}", file=sys.stderr)
        return result.interrupted.exit_code
    if result.failed:
        print(f"error: {len(result.failed)} of {len(runs)} arms failed: "
              + "; ".join(f"{name}: {reason}" for name, reason in result.failed.items()), file=sys.stderr)
        return 1
    return 0


GENERATE_HELP = """usage: python generate.py ckpt=<path|last> [prompt="def "] [max_tokens=256] [temperature=0.8]
                          [top_k=0] [top_p=1.0] [seed=0] [device=auto] [out_dir=outputs] [--plugin FILE ...]
ckpt=last takes the best checkpoint of the newest run under out_dir. temperature=0 decodes greedily.
A model with a plug-in mixer or router needs its file: --plugin FILE (repeatable) or $BLACKMAMBA_PLUGINS."""
GENERATE_DEFAULTS = {"ckpt": None, "prompt": "def ", "max_tokens": 256, "temperature": 0.8, "top_k": 0,
                     "top_p": 1.0, "seed": 0, "device": "auto", "out_dir": "outputs"}


def _parse_generate_args(argv: list[str]) -> dict:
    args = dict(GENERATE_DEFAULTS)
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or key not in args:
            raise ConfigError(f"bad argument '{token}'; valid keys: {', '.join(args)}")
        default = GENERATE_DEFAULTS[key]
        try:
            args[key] = type(default)(value) if default is not None and key != "prompt" else value
        except ValueError:
            raise ConfigError(f"{key} must be a {type(default).__name__}, got '{value}'") from None
    if not args["ckpt"]:
        raise ConfigError("give a checkpoint: ckpt=<path> or ckpt=last")
    if args["max_tokens"] < 1:
        raise ConfigError("max_tokens must be >= 1")
    return args


def main_generate(argv: list[str]) -> int:
    try:
        argv = with_plugins(argv)
    except PluginError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(GENERATE_HELP)
        return 0
    import time
    from pathlib import Path

    import torch

    from experiments.generation import generate, load_model
    from experiments.tokenizers import build_tokenizer

    ckpt = None
    try:
        args = _parse_generate_args(argv)
        ckpt = args["ckpt"]
        if ckpt == "last":
            found = sorted(Path(args["out_dir"]).glob("runs/*/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise ConfigError(f"ckpt=last: no run with a checkpoint under {args['out_dir']}/runs")
            ckpt = found[-1]
        device = args["device"] if args["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, saved = load_model(ckpt, device)
        tokenizer = build_tokenizer(_saved_tokenizer(saved))
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {one_line(_explain_unknown_name(e, ckpt))}", file=sys.stderr)
        return 2
    prompt_ids = tokenizer.encode(args["prompt"]) or [0]
    prompt = torch.tensor([prompt_ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args["seed"])
    t0 = time.perf_counter()
    out = generate(model, prompt, args["max_tokens"], args["temperature"], args["top_k"] or None, args["top_p"], gen)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(args["prompt"] + tokenizer.decode(out[0].tolist()))
    print(f"\n[{args['max_tokens']} tokens in {dt:.2f} s: {args['max_tokens'] / dt:.1f} tokens/s on {device}]", file=sys.stderr)
    return 0


UNKNOWN_NAME = re.compile(r"unknown (mixer|router) '([^']*)'")  # blocks.registry.lookup's message


def _explain_unknown_name(error: Exception, ckpt) -> str:
    """A checkpoint whose mixer or router is not registered was trained with a plug-in: say which (from its
    run's plugins.json, runs/<id>/checkpoints/<file>.ckpt -> runs/<id>/) and how to load it."""
    found = UNKNOWN_NAME.search(str(error))
    if not found or ckpt is None:
        return str(error)
    run_dir = Path(str(ckpt)).expanduser().parent.parent
    return f"{error}; {missing_plugin_hint(run_dir, *found.groups())}"


def _saved_tokenizer(saved: dict) -> str:
    """The tokenizer name recorded in a checkpoint's run config."""
    return OmegaConf.create(saved["run_config"]).data.tokenizer
