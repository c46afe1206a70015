"""Experiments of several runs: an experiment file with a `runs:` mapping (conf/experiment/router_comparison.yaml)
trains one run per arm: the shared settings, the command line's overrides (which reach every arm, and so may not
set a key that an arm sets) and the arm's own; then writes their comparison report
(analysis.report.comparison_report).

    runs:                      # arm name -> the overrides that make it
      top1: [router=top1]
      aux_free: [router=aux_free]

Every arm is composed and checked before the first one trains, so a bad override fails at once, naming its
arm. Each arm is an ordinary training run (MLflow run name = the arm, tags comparison_arm and comparison_id);
an arm that crashes is recorded FAILED (tag end_reason, the traceback as artifact error.txt) and the others
still train; the report lists it.
"""
from __future__ import annotations

import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.checkpoint import CheckpointError
from experiments.config import ConfigError, compose, split_argv
from experiments.tracking import open_store, tracking_uri

# Errors with a message for the user (bad data, a bad checkpoint, a diverged run): one line, no traceback.
EXPECTED_ERRORS = (ConfigError, CheckpointError, FloatingPointError)
SHARED_KEYS = ("out_dir", "tracking.experiment", "tracking.uri")  # where the report finds the arms' runs


@dataclass
class Comparison:
    """What a comparison left: each arm's MLflow run id, why arms failed, the report (None if no arm
    finished), and, when SIGTERM or Ctrl-C stopped it, that Interrupted with the arms never started."""

    run_ids: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    interrupted: KeyboardInterrupt | None = None
    not_started: list[str] = field(default_factory=list)


def arm_configs(argv: list[str], runs: dict[str, list[str]]) -> dict[str, DictConfig]:
    """Every arm's resolved config, all checked before any trains: argv, then the arm's overrides, and the
    arm's name as the MLflow run name."""
    if "resume" in {key for key, _ in split_argv(argv)[1]}:
        raise ConfigError("resume= continues one run, not a comparison: resume an arm with python run.py "
                          "resume=<its run id> (add --runs to this command to list the arms' runs)")
    _refuse_overlap(argv, runs)
    configs = {}
    for name, overrides in runs.items():
        try:
            configs[name] = compose([*argv, *overrides, f"tracking.run_name={name}"], arm=True)
        except ConfigError as e:
            raise ConfigError(f"arm '{name}' ({' '.join(overrides) or 'no overrides'}): {e}") from None
    for key in SHARED_KEYS:
        values = {str(OmegaConf.select(cfg, key)) for cfg in configs.values()}
        if len(values) > 1:
            raise ConfigError(f"the arms must share {key} (one store, one report), got {', '.join(sorted(values))}")
    return configs


def _keys(tokens: list[str]) -> set[str]:
    """The group picks and dotted keys (aliases expanded) that override tokens set."""
    picks, dotted = split_argv(tokens)
    return set(picks) | {key for key, _ in dotted}


def _refuse_overlap(argv: list[str], runs: dict[str, list[str]]) -> None:
    """A command-line override applies to every arm, so it must not be a key that an arm sets (the arm's value
    would silently win for that arm, and `router=...` would be ignored by every arm)."""
    given = _keys(argv)
    for name, overrides in runs.items():
        both = given & (_keys(overrides) | {"tracking.run_name"})  # each arm's run is named after the arm
        if both:
            raise ConfigError(f"{', '.join(sorted(both))}: set on the command line and by arm '{name}' "
                              f"({' '.join(overrides) or 'its run name'}); a command-line override applies to "
                              "every arm, so drop it there (or change the arm in the experiment file)")


def run_comparison(argv: list[str], runs: dict[str, list[str]]) -> Comparison:
    """Train every arm in turn, then write the comparison report of exactly these runs under
    <out_dir>/analysis/<tracking.experiment>/ (report.md and figures/). Ctrl-C / SIGTERM stop the whole
    comparison (the arm being trained ends KILLED with a checkpoint, as any run does); the report then covers
    the arms trained so far, so a comparison cut short by a time limit still leaves one."""
    from experiments.train import Interrupted

    configs = arm_configs(argv, runs)
    session = uuid.uuid4().hex[:12]  # tells this comparison's runs from earlier ones in the same experiment
    result = Comparison()
    for i, (name, cfg) in enumerate(configs.items(), 1):
        print(f"=== arm {i}/{len(configs)}: {name} ({' '.join(runs[name]) or 'the shared settings'})", flush=True)
        try:
            run_id, reason = _train_arm(name, cfg, {"comparison_arm": name, "comparison_id": session})
        except Interrupted as e:
            result.run_ids[name], result.failed[name], result.interrupted = e.run_id, f"stopped by {e.signal_name}", e
            result.not_started = list(configs)[i:]
            open_store(tracking_uri(cfg)).set_tag(e.run_id, "end_reason", result.failed[name])
            break
        result.run_ids[name] = run_id
        if reason:
            result.failed[name] = reason
    result.report = _report(next(iter(configs.values())), result)
    return result


def _train_arm(name: str, cfg: DictConfig, tags: dict[str, str]) -> tuple[str, str | None]:
    """(run id, None) for an arm that trained; (run id of its FAILED run, reason) for one that raised."""
    from experiments.cli import one_line
    from experiments.train import Interrupted, train  # imports Lightning: after every arm is checked

    try:
        return train(cfg, tags=tags).run_id, None
    except Interrupted:  # stops the comparison (run_comparison), not only this arm
        raise
    except Exception as e:  # noqa: BLE001  one arm's crash (a bug, bad data, divergence) must not end the others
        reason = f"{type(e).__name__}: {one_line(e)}"
        trace = traceback.format_exc()
        run_id = _record_failure(cfg, tags, reason, trace)
        if not isinstance(e, EXPECTED_ERRORS):  # a bug: whoever fixes it needs to see where it happened
            print(trace, file=sys.stderr, end="")
        print(f"arm {name} failed: {reason} (MLflow run {run_id}, traceback in its artifact error.txt); "
              "going on with the next arm", file=sys.stderr, flush=True)
        return run_id, reason


def _record_failure(cfg: DictConfig, tags: dict[str, str], reason: str, trace: str) -> str:
    """Mark the arm's MLflow run FAILED with the reason; make one if the arm failed before its run existed
    (bad data is found before the run starts)."""
    client = open_store(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    found = client.search_runs([experiment.experiment_id], query, max_results=1) if experiment else []
    if found:
        run_id = found[0].info.run_id
    else:
        from experiments.tracking import make_logger

        run_id = make_logger(cfg, extra_tags=tags).run_id
        client.log_param(run_id, "tracking.run_name", cfg.tracking.run_name)  # the arm's name in the report
    client.set_tag(run_id, "end_reason", reason[:5000])
    client.log_text(run_id, trace, "error.txt")
    client.set_terminated(run_id, "FAILED")
    return run_id


def _report(cfg: DictConfig, result: Comparison) -> Path | None:
    """The comparison report of the arms' runs, or None when no arm finished (there is nothing to compare)."""
    from analysis.report import comparison_report

    if len(result.failed) == len(result.run_ids):
        return None
    experiment = cfg.tracking.experiment
    out = Path(cfg.out_dir) / "analysis" / experiment
    return comparison_report(experiment, out, tracking_uri(cfg), fmt="md", run_ids=list(result.run_ids.values()))
