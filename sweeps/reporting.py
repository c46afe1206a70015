"""The end of a study: its best trial (or Pareto front) with the run.py command that reproduces each,
their resolved configs as YAML, a table of all trials, and the study's plots, written under
<out_dir>/sweeps/<study>/ (each through a temporary file and a rename) and logged to the study's MLflow parent run.

    best.yaml                      the best trial's config (single objective)
    pareto/trial-<n>.yaml          each Pareto-optimal trial's config (several objectives)
    trials.csv                     every trial: state, values, params, user attrs (command, tokens, FLOPs)
    optimization_history.png, param_importances.png, intermediate_values.png, pareto_front.png
"""
from __future__ import annotations

import io
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib as vm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from optuna.importance import FanovaImportanceEvaluator  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from experiments.checkpoint import atomic_write_bytes, atomic_write_text  # noqa: E402
from experiments.config import ConfigError, compose  # noqa: E402
from sweeps.space import short_params  # noqa: E402
from sweeps.spec import SweepSpec  # noqa: E402


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto-optimal trials (several), by trial number."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return [study.best_trial] if len(study.directions) == 1 else sorted(study.best_trials, key=lambda t: t.number)


def report(study: optuna.Study, spec: SweepSpec, out: Path, client: MlflowClient, parent_run_id: str) -> list[Path]:
    """Print the summary and write (and log) the files of the module docstring; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"\nstudy '{study.study_name}': {len(trials)} trials ({states})")
    files = []
    best = best_trials(study)
    if not best:
        print("no completed trial yet")
    shutil.rmtree(out / "pareto", ignore_errors=True)  # the front of an earlier invocation may have moved
    for t in best:
        values = ", ".join(f"{m} {v:.4g}" for m, v in zip(spec.objectives, t.values))
        print(f"{'best trial' if len(spec.objectives) == 1 else 'Pareto-optimal trial'} "
              f"{t.number}: {values} | {short_params(t.params)}\n  {t.user_attrs['command']}")
        path = out / "best.yaml" if len(spec.objectives) == 1 else out / "pareto" / f"trial-{t.number}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cfg = OmegaConf.to_yaml(compose(t.user_attrs["run_argv"]))
        except ConfigError as e:  # conf/ changed since the trial ran
            print(f"  (its config no longer composes: {e})")
            continue
        atomic_write_text(path, f"# trial {t.number}: {values}\n# {t.user_attrs['command']}\n{cfg}")
        files.append(path)
    if trials:
        atomic_write_text(out / "trials.csv", study.trials_dataframe().to_csv(index=False))
        files.append(out / "trials.csv")
    files += plots(study, spec, out)
    for path in files:
        client.log_artifact(parent_run_id, str(path), artifact_path="pareto" if path.parent.name == "pareto" else None)
    if best and len(spec.objectives) == 1:
        client.log_metric(parent_run_id, f"best/{spec.objectives[0]}", best[0].value, step=len(trials))
    print(f"results: {out}")
    return files


def _importances_ok(study: optuna.Study, target: Callable | None) -> str:
    """'' when parameter importances can be computed, else why not."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return "needs >= 2 completed trials"
    try:
        found = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                        target=target)
    except (ValueError, RuntimeError) as e:
        return str(e).splitlines()[0]
    return "" if found else "no parameter varied across all completed trials"


def plots(study: optuna.Study, spec: SweepSpec, out: Path) -> list[Path]:
    """The study's plots as PNG; a plot that the trials cannot support yet is skipped with a note."""
    metric = spec.objectives[0]
    single = len(spec.objectives) == 1
    target = None if single else (lambda t: t.values[0])
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    jobs: dict[str, tuple[str, Callable]] = {
        "optimization_history": ("", lambda: vm.plot_optimization_history(
            study, target=target, target_name=metric)),
        "param_importances": (_importances_ok(study, target), lambda: vm.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0), target=target, target_name=metric)),
    }
    if single:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        has_curves = any(t.intermediate_values for t in finished)
        jobs["intermediate_values"] = ("" if has_curves else "no intermediate values", lambda: _labelled(
            vm.plot_intermediate_values(study), "Step", f"validation {metric}"))
    else:
        why = "" if len(spec.objectives) <= 3 else "needs 2 or 3 objectives"
        jobs["pareto_front"] = (why, lambda: vm.plot_pareto_front(study, target_names=spec.objectives))
    written = []
    for name, (why_not, draw) in jobs.items():
        if why_not:
            print(f"plot {name}: skipped ({why_not})")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = draw()
        title = " ".join(ax.get_title(loc) for loc in ("left", "center", "right") if ax.get_title(loc))
        for loc in ("left", "right"):
            ax.set_title("", loc=loc)
        ax.set_title(f"{title}: study '{study.study_name}'")
        if name in ("optimization_history", "intermediate_values"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend() is not None and len(ax.get_legend().get_texts()) > 12:
            ax.get_legend().remove()  # one entry per trial: unreadable beyond a dozen
        fig = ax.figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(out / f"{name}.png", png.getvalue())
        written.append(out / f"{name}.png")
    return written


def _labelled(ax, xlabel: str, ylabel: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax
