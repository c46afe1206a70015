"""One trial: sample overrides, plan the budget, train with experiments.train.train, return the objectives.

Each trial is a nested MLflow run under the study's parent run (tag mlflow.parentRunId), named trial-<n>,
whose end state says what Optuna recorded: FINISHED (optuna.state=COMPLETE), KILLED (PRUNED) or FAILED
(FAIL, with the reason in optuna.fail_reason). The trial's console output goes to
<out_dir>/sweeps/<study>/logs/trial-<n>.log.
"""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from experiments.config import ALIASES, compose
from experiments.train import Interrupted, train
from sweeps import budget as budgets
from sweeps.space import format_value, short_params, trial_overrides
from sweeps.spec import SweepSpec
from sweeps.study import end_trial_run

ACCOUNTING_METRICS = {"params_active": "active_params", "params_total": "total_params",
                      "train_flops_per_token": "train_flops_per_token"}


class TrialReporter(Callback):
    """After each validation: report `metric` to the trial (single-objective studies: Optuna keeps no
    intermediate values for several); at the next training step, once the validation is logged to MLflow,
    fail on a non-finite value and raise TrialPruned if the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, report: bool, prune: bool):
        self.trial, self.metric, self.report, self.prune = trial, metric, report, prune
        self.pending: tuple[int, float] | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.pending = (trainer.global_step, float(trainer.callback_metrics[self.metric]))
        if self.report and math.isfinite(self.pending[1]):
            self.trial.report(self.pending[1], step=self.pending[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.pending is None:
            return
        (step, value), self.pending = self.pending, None
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite {self.metric} {value} at step {step}")
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric} {value:.4f})")


def command(argv: list[str]) -> str:
    return "python run.py " + shlex.join(argv)


def merged_argv(base: list[str], overrides: list[str]) -> list[str]:
    """base + overrides without the base tokens that an override sets again (the same config, a shorter line)."""
    def key(token: str) -> str:
        name = token.partition("=")[0]
        return ALIASES.get(name, name)

    again = {key(t) for t in overrides}
    return [t for t in base if key(t) not in again] + overrides


@dataclass
class Objective:
    """The function Optuna calls per trial (see the module docstring)."""

    spec: SweepSpec
    base_argv: list[str]
    budget: dict
    tracking_uri: str
    parent_run_id: str
    log_dir: Path

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        try:
            objectives = self._run(trial)
        except optuna.TrialPruned as e:
            self._end(trial, "KILLED", "PRUNED", str(e))
            raise
        except (Exception, KeyboardInterrupt, SystemExit) as e:  # Lightning turns Ctrl+C into SystemExit
            if isinstance(e, Interrupted):  # SIGTERM or Ctrl-C, with the trial's run checkpointed
                reason = f"interrupted: {e}"
            elif isinstance(e, (KeyboardInterrupt, SystemExit)):
                reason = "interrupted (Ctrl+C)"
            else:
                reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason)
            self._end(trial, "FAILED", "FAIL", reason)
            if isinstance(e, SystemExit):
                raise KeyboardInterrupt from e
            raise
        self._end(trial, "FINISHED", "COMPLETE", None)
        return objectives[0] if len(objectives) == 1 else objectives

    def _run(self, trial: optuna.Trial) -> list[float]:
        values, overrides = trial_overrides(self.spec.params, lambda p: p.suggest(trial), self.base_argv)
        plan = budgets.plan(compose(self.base_argv + overrides), self.budget)
        overrides += [f"trainer.max_steps={plan.max_steps}", f"trainer.val_every={plan.val_every}"]
        argv = merged_argv(self.base_argv, overrides)
        log = self.log_dir / f"trial-{trial.number}.log"
        for key, value in (("run_argv", argv), ("command", command(argv)), ("max_steps", plan.max_steps),
                           ("tokens", plan.tokens), ("train_flops", plan.train_flops),
                           ("params_active", plan.accounting.active_params), ("log", str(log)),
                           ("worker", f"{socket.gethostname()}:{os.getpid()}")):
            trial.set_user_attr(key, value)
        cfg = compose(argv)
        cfg.trainer.progress_bar = False
        cfg.tracking.run_name = f"trial-{trial.number}"
        tags = {"mlflow.parentRunId": self.parent_run_id, "optuna.study": trial.study.study_name,
                "optuna.trial": str(trial.number), "sweep": self.spec.name,
                **{f"optuna.param.{k}": format_value(v) for k, v in values.items()}}
        reporter = TrialReporter(trial, self.spec.objectives[0], report=len(self.spec.objectives) == 1,
                                 prune=self.spec.pruner["name"] != "none")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(command(argv), flush=True)
            try:
                result = train(cfg, callbacks=[reporter], tags=tags)
            except BaseException:
                traceback.print_exc()
                raise
        metrics = {**result.metrics, **{m: float(getattr(plan.accounting, a)) for m, a in ACCOUNTING_METRICS.items()}}
        missing = [m for m in self.spec.objectives if m not in metrics]
        if missing:
            raise KeyError(f"the run logged no {', '.join(missing)}")
        objectives = [metrics[m] for m in self.spec.objectives]
        if not all(math.isfinite(v) for v in objectives):
            raise FloatingPointError(f"non-finite objective(s) {dict(zip(self.spec.objectives, objectives))}")
        return objectives

    def _end(self, trial: optuna.Trial, status: str, state: str, reason: str | None) -> None:
        run_id = end_trial_run(MlflowClient(self.tracking_uri), self.parent_run_id, trial.study.study_name,
                               trial.number, status, state, reason)
        trial.set_user_attr("mlflow_run_id", run_id)


class Progress:
    """One line per finished trial (number, state, values, params, duration), and the trial's value(s)
    logged to the parent run at step = trial number."""

    def __init__(self, spec: SweepSpec, tracking_uri: str, parent_run_id: str):
        self.spec, self.client, self.parent = spec, MlflowClient(tracking_uri), parent_run_id

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial.state.name
        if state == "COMPLETE":
            shown = ", ".join(f"{m} {v:.4g}" for m, v in zip(self.spec.objectives, trial.values))
            for m, v in zip(self.spec.objectives, trial.values):
                self.client.log_metric(self.parent, f"trials/{m}", v, step=trial.number)
        elif state == "PRUNED" and trial.intermediate_values:
            step = max(trial.intermediate_values)
            shown = f"at step {step}: {self.spec.objectives[0]} {trial.intermediate_values[step]:.4g}"
        else:
            shown = trial.user_attrs.get("fail_reason", "")[:200]
        print(f"trial {trial.number:>3} {state:<8} {shown} | {short_params(trial.params)} | "
              f"{trial.duration.total_seconds() if trial.duration else 0:.1f} s", flush=True)
