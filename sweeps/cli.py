"""python sweep.py sweep=<name> [run.py overrides] [sweep keys]: check everything, open the study and its
MLflow parent run, run trials (in this process, or in n_jobs worker processes), then report."""
from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from experiments.cli import one_line, with_plugins
from experiments.config import ConfigError, compose, experiment_runs, multi_run_error
from experiments.plugins import PluginError
from experiments.config import split_argv as split_run_argv
from experiments.tracking import open_store, tracking_uri
from sweeps import budget as budgets
from sweeps.samplers import PRUNERS, SAMPLERS, SINGLE_OBJECTIVE_SAMPLERS, make_pruner, make_sampler
from sweeps.space import check_params, grid_space, target_keys
from sweeps.spec import OBJECTIVES, SweepSpec, load_sweep, sweep_names, with_keys
from sweeps.study import (default_storage, mlflow_experiment, open_storage, open_study, parent_run, redact,
                          setup_lock)

SWEEP_PY = Path(__file__).resolve().parent.parent / "sweep.py"
SWEEP_KEYS = ("sweep", "study", "storage", "n_trials", "n_jobs", "timeout", "objectives", "sampler", "pruner")
SWEEP_PREFIXES = ("sampler.", "pruner.", "budget.")
DEFAULT_TRIALS = 10


@dataclass
class Session:
    """Everything a sweep command has checked and opened before its first trial."""

    spec: SweepSpec
    base_argv: list[str]
    base: DictConfig
    budget: dict
    study: optuna.Study
    storage_url: str
    client: MlflowClient
    parent_run_id: str
    n_trials: int
    n_jobs: int
    timeout: float | None

    @property
    def out(self) -> Path:
        return Path(self.base.out_dir) / "sweeps" / self.study.study_name


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(sweep keys, run.py overrides) of a sweep.py command line."""
    keys: dict[str, str] = {}
    run_argv: list[str] = []
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{token}' (see --help)")
        if key in SWEEP_KEYS or key.startswith(SWEEP_PREFIXES):
            keys[key] = value
        else:
            run_argv.append(token)
    return keys, run_argv


def _number(keys: dict[str, str], name: str, default, cast=int, minimum=0):
    if name not in keys:
        return default
    try:
        value = cast(keys[name])
    except ValueError:
        value = None
    if value is None or value < minimum:
        what = "an integer" if cast is int else "a number"
        raise ConfigError(f"{name} must be {what} >= {minimum}, got '{keys[name]}'")
    return value


def open_session(argv: list[str], worker: int = 0) -> Session:
    """Check the sweep, its space, budget, sampler and pruner against the composed base config, then open
    the study and the parent run. Every user error raises ConfigError before any trial starts."""
    keys, run_argv = split_argv(argv)
    if "sweep" not in keys:
        raise ConfigError(f"give a sweep: sweep=<name> ({', '.join(sweep_names())}) or sweep=<file.yaml>")
    spec = with_keys(load_sweep(keys["sweep"]), keys)
    picks, dotted = split_run_argv(run_argv)
    if "resume" in {k for k, _ in dotted}:
        raise ConfigError("resume= continues one run; a study resumes when you re-run the same sweep command")
    both = target_keys(spec.params) & (set(picks) | {k for k, _ in dotted})
    if both:
        raise ConfigError(f"{', '.join(sorted(both))}: searched by sweep '{spec.name}' and also set on the "
                          "command line; drop one")
    base_argv = spec.overrides + run_argv
    runs = experiment_runs(base_argv)
    if runs:
        name = split_run_argv(base_argv)[0]["experiment"]
        raise multi_run_error(name, runs, "a sweep's trials are single runs")
    base = compose(base_argv)
    where = f"sweep '{spec.name}'"
    check_params(spec.params, base_argv, where)
    budget = budgets.resolve(spec.budget, base)
    budgets.plan(base, budget)
    grid = grid_space(spec.params, where) if spec.sampler["name"] == "grid" else None
    if len(spec.objectives) > 1 and spec.sampler["name"] in SINGLE_OBJECTIVE_SAMPLERS:
        raise ConfigError(f"sampler={spec.sampler['name']} handles one objective; use tpe, gp, nsga2 or random")
    sampler, pruner = make_sampler(spec.sampler, grid, worker), make_pruner(spec.pruner)
    n_trials, n_jobs = _number(keys, "n_trials", None), _number(keys, "n_jobs", 1, minimum=1)
    timeout = _number(keys, "timeout", None, float, minimum=1)
    storage_url = keys.get("storage") or default_storage(base)
    params = {"sweep": spec.name, "objectives": ",".join(spec.objectives), "sampler": str(spec.sampler),
              "pruner": str(spec.pruner), "budget": budgets.describe(budget), "storage": redact(storage_url),
              "overrides": shlex.join(base_argv), "space": ", ".join(p.name for p in spec.params)}
    with setup_lock(base.out_dir):
        client = open_store(tracking_uri(base))
        storage = open_storage(storage_url, tracking_uri(base))
        study = open_study(storage, keys.get("study", spec.name), spec, budget, sampler, pruner)
        parent = parent_run(study, client, mlflow_experiment(client, base), params)
    if n_trials is None and grid is not None:
        visited = {t.system_attrs.get("grid_id") for t in study.get_trials(deepcopy=False)} - {None}
        n_trials = math.prod(len(v) for v in grid.values()) - len(visited)
    elif n_trials is None:
        n_trials = spec.n_trials if spec.n_trials is not None else DEFAULT_TRIALS
    return Session(spec, base_argv, base, budget, study, storage_url, client, parent, n_trials, n_jobs, timeout)


def run_trials(s: Session) -> None:
    from sweeps.objective import Objective, Progress  # imports Lightning: after the checks

    objective = Objective(s.spec, s.base_argv, s.budget, tracking_uri(s.base), s.parent_run_id, s.out / "logs")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # Progress prints one line per trial instead
    s.study.optimize(objective, n_trials=s.n_trials, timeout=s.timeout, catch=(Exception,),
                     callbacks=[Progress(s.spec, tracking_uri(s.base), s.parent_run_id)], gc_after_trial=True)


def run_workers(argv: list[str], n_trials: int, n_jobs: int) -> int:
    """Split n_trials over n_jobs processes that each run this command on the shared study. Each gets an
    equal share of the CPU threads (unless OMP_NUM_THREADS is set): oversubscribed OpenMP threads spin and
    can make every worker many times slower. The plug-ins reach the workers through $BLACKMAMBA_PLUGINS,
    which loading them set to every file this process loaded (argv no longer holds --plugin)."""
    shares = [n_trials // n_jobs + (i < n_trials % n_jobs) for i in range(n_jobs)]
    argv = [a for a in argv if not a.startswith(("n_trials=", "n_jobs="))]
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n_jobs)), **os.environ}
    procs = [subprocess.Popen([sys.executable, str(SWEEP_PY), *argv, f"n_trials={k}", "n_jobs=1", f"--worker={i}"],
                              env=env) for i, k in enumerate(shares) if k]
    try:
        return max((p.wait() for p in procs), default=0)
    except KeyboardInterrupt:  # Ctrl+C reached the workers too: let them record their trials, then stop
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
        raise


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        argv = with_plugins(argv)  # before the session composes the base config: plug-in names are choices
    except PluginError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    workers = [a.split("=", 1)[1] for a in argv if a.startswith("--worker=")]
    argv = [a for a in argv if not a.startswith("--worker=")]
    try:
        if workers and not workers[-1].isdigit():
            raise ConfigError(f"--worker must be a worker number, got '{workers[-1]}'")
        worker = int(workers[-1]) if workers else None
        s = open_session(argv, worker or 0)
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if worker is not None:  # one of run_workers' processes: trials only
        try:
            if s.n_trials:
                run_trials(s)
        except KeyboardInterrupt:
            return 130
        return 0
    print(header(s))
    s.client.update_run(s.parent_run_id, status="RUNNING")
    status, code = "FINISHED", 0
    try:
        if s.n_jobs > 1:
            code = 1 if run_workers(argv, s.n_trials, s.n_jobs) else 0
        elif s.n_trials:
            run_trials(s)
    except KeyboardInterrupt:
        status, code = "KILLED", 130
        print("\ninterrupted: reporting the trials so far", file=sys.stderr)
    from sweeps.reporting import report

    report(s.study, s.spec, s.out, s.client, s.parent_run_id)
    s.client.set_terminated(s.parent_run_id, status)
    return code


def header(s: Session) -> str:
    objectives = ", ".join(f"{m} ({OBJECTIVES[m][:3]})" for m in s.spec.objectives)
    lines = [
        f"study '{s.study.study_name}' ({len(s.study.trials)} trials so far) in {redact(s.storage_url)}",
        f"  sweep {s.spec.name}: {objectives}; sampler {s.spec.sampler['name']}, pruner {s.spec.pruner['name']}",
        f"  {budgets.describe(s.budget)}",
        f"  {s.n_trials} trials in {s.n_jobs} process(es); MLflow parent run {s.parent_run_id} in experiment "
        f"'{s.base.tracking.experiment}' at {redact(tracking_uri(s.base))}",
    ]
    return "\n".join(lines + ([f"  {s.spec.note}"] if s.spec.note else []))


def help_text() -> str:
    lines = ["usage: python sweep.py [--plugin FILE ...] sweep=<name|file.yaml> [run.py overrides ...] [sweep keys ...]", "",
             "sweeps (conf/sweep/<name>.yaml):"]
    for name in sweep_names():
        try:
            lines.append(f"  {name:<11} {load_sweep(name).description}")
        except ConfigError as e:
            lines.append(f"  {name:<11} (invalid: {e})")
    lines += [
        "",
        "sweep keys (every other key=value is a run.py override: see python run.py --help):",
        "  study=NAME           study name in the storage (default: the sweep's name); re-running adds trials",
        "  storage=URL          sqlite:///<out_dir>/optuna.db (default), journal:<file>, postgresql://..., mysql://...",
        "  n_trials=N           trials this command adds (default: the sweep file's; a grid: its points left)",
        "  n_jobs=N             worker processes on this machine sharing the study (default 1)",
        "  timeout=SECONDS      start no new trial after this long",
        f"  objectives=A,B       metrics to optimize: {', '.join(OBJECTIVES)}",
        f"  sampler=NAME         {', '.join(SAMPLERS)}; sampler.seed=N, sampler.<option>=V",
        f"  pruner=NAME          {', '.join(PRUNERS)}; pruner.<option>=V (single validation objective only)",
        "  budget.tokens=N | budget.flops=F | budget.tokens_per_param=R    per trial; budget.reports=K validations",
        "",
        "examples:",
        "  python sweep.py sweep=experts n_trials=20",
        "  python sweep.py sweep=routers model=tiny trainer=debug n_trials=3",
        "  python sweep.py sweep=lr budget.flops=1e14 n_jobs=2",
        "  python sweep.py sweep=experts objectives=val/bpb,params_active",
        "  python sweep.py sweep=scaling budget.tokens_per_param=20",
        "docs/sweeps.md has the search-space format, storage for many machines and optuna-dashboard.",
    ]
    return "\n".join(lines)
