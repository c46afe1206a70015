"""Sweeps end to end on the CPU with tiny models: real Optuna studies, real MLflow stores, real processes."""
import shlex
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from experiments.config import compose
from sweeps import budget as budgets
from sweeps.cli import main
from sweeps.samplers import SAMPLERS

TOP_K = "params: {moe.top_k: {type: int, low: 1, high: 2}}"
FAST = ["budget.reports=2", "sampler.seed=0"]  # tiny argv's 4 steps of 4 x 32 tokens; validate at steps 2, 4


def client_for(out_dir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}")


def load(out_dir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}")


def children(client: MlflowClient, parent_id: str) -> dict[int, object]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {int(r.data.tags["optuna.trial"]): r for r in runs}


def write_sweep(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return f"sweep={path}"


def test_study_runs_tracks_plots_and_resumes(tiny, tmp_path, capsys):
    assert main(tiny("sweep=experts", "n_trials=4", *FAST)) == 0
    out = capsys.readouterr().out
    study = load(tmp_path, "experts")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert study.user_attrs["budget"] == {"tokens": 4 * 4 * 32, "reports": 2}
    assert "fixed tokens per trial: 512" in study.user_attrs["budget_rule"]
    for t in study.trials:
        assert 1 <= t.params["moe.top_k"] <= 2 <= t.params["moe.num_experts"] <= 64
        assert t.user_attrs["max_steps"] == 4 and sorted(t.intermediate_values) == [2, 4]

    client = client_for(tmp_path)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna.study"] == "experts"
    runs = children(client, parent_id)
    assert sorted(runs) == [0, 1, 2, 3]
    for number, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.info.run_name == f"trial-{number}" and run.info.experiment_id == parent.info.experiment_id
        assert run.data.params["moe.num_experts"] == str(study.trials[number].params["moe.num_experts"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/bpb")] == [2, 4]

    results = tmp_path / "sweeps" / "experts"
    plots = ["optimization_history.png", "param_importances.png", "intermediate_values.png"]
    for name in ["best.yaml", "trials.csv", *plots]:
        assert (results / name).is_file(), name
    assert {"best.yaml", "trials.csv", *plots} <= {a.path for a in client.list_artifacts(parent_id)}
    best = study.best_trial
    assert f"best trial {best.number}: val/bpb {best.value:.4g}" in out and best.user_attrs["command"] in out

    # the printed command reproduces the trial's config (all but its console and run-name settings)
    argv = shlex.split(best.user_attrs["command"])
    assert argv[:2] == ["python", "run.py"]
    reproduced = compose(argv[2:])
    trial_cfg = OmegaConf.load(tmp_path / "runs" / best.user_attrs["mlflow_run_id"] / "config.yaml")
    assert trial_cfg.tracking.run_name == f"trial-{best.number}"
    for cfg in (reproduced, trial_cfg):
        cfg.trainer.progress_bar, cfg.tracking.run_name = False, None
    assert reproduced == trial_cfg
    assert OmegaConf.load(results / "best.yaml") == compose(argv[2:])

    # the same command again adds trials to the same study, under the same parent run
    assert main(tiny("sweep=experts", "n_trials=1", *FAST)) == 0
    study = load(tmp_path, "experts")
    assert len(study.trials) == 5 and study.user_attrs["mlflow_parent_run_id"] == parent_id
    assert sorted(children(client, parent_id)) == [0, 1, 2, 3, 4]
    parents = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'experts'")
    assert [p.info.run_id for p in parents] == [parent_id]


def test_a_worse_trial_is_pruned_a_raising_one_failed_and_the_study_goes_on(tiny, tmp_path, capsys):
    space = write_sweep(tmp_path, "pruner: {name: median, n_startup_trials: 1}\n"
                                  "params: {optim.lr: {type: categorical, choices: [0.02, 0.0, 1.0e+30]}}\n")
    argv = tiny(space, "optim.warmup_steps=1", "trainer.grad_clip=0", "budget.reports=4", "study=forced")
    assert main([*argv, "n_trials=0"]) == 0  # creates the study; then queue a good, a bad and a raising trial
    study = load(tmp_path, "forced")
    for lr in (0.02, 0.0, 1e30):  # lr 0 never learns: worse than the median at its first report
        study.enqueue_trial({"optim.lr": lr})
    assert main([*argv, "n_trials=3"]) == 0
    good, bad, nan = load(tmp_path, "forced").trials
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED" and nan.state.name == "FAIL"
    assert sorted(bad.intermediate_values) == [1], "pruned at its first report, not trained to the end"
    assert bad.intermediate_values[1] > good.intermediate_values[1]
    assert nan.user_attrs["fail_reason"].startswith("FloatingPointError: non-finite")
    runs = children(client_for(tmp_path), study.user_attrs["mlflow_parent_run_id"])
    assert runs[bad.number].info.status == "KILLED" and runs[bad.number].data.tags["optuna.state"] == "PRUNED"
    assert "pruned at step 1" in runs[bad.number].data.tags["optuna.prune_reason"]
    assert runs[nan.number].info.status == "FAILED" and runs[nan.number].data.tags["optuna.state"] == "FAIL"
    assert runs[nan.number].data.tags["optuna.fail_reason"] == nan.user_attrs["fail_reason"]
    assert runs[good.number].info.status == "FINISHED"
    out = capsys.readouterr().out
    assert "trial   1 PRUNED" in out and "trial   2 FAIL     FloatingPointError" in out and "best trial 0" in out


def test_two_worker_processes_share_one_study(tiny, tmp_path):
    assert main(tiny("sweep=lr", "n_trials=4", "n_jobs=2", "sampler=random", *FAST)) == 0
    study = load(tmp_path, "lr")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3], "no trial lost, none duplicated"
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2, "both processes ran trials"
    assert len({t.params["optim.lr"] for t in study.trials}) == 4, "the workers' seeds differ"
    runs = children(client_for(tmp_path), study.user_attrs["mlflow_parent_run_id"])
    assert sorted(runs) == [0, 1, 2, 3] and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert (tmp_path / "sweeps" / "lr" / "best.yaml").is_file(), "the coordinating process reported"


def test_budget_sets_steps_from_tokens_or_flops(tiny):
    cfg = compose(tiny())
    tokens_per_step = 4 * 32
    plan = budgets.plan(cfg, {"tokens": 6 * tokens_per_step, "reports": 3})
    assert (plan.max_steps, plan.val_every, plan.tokens) == (6, 2, 6 * tokens_per_step)
    acc = budgets.accounting(cfg)
    flops = budgets.plan(cfg, {"flops": 10 * tokens_per_step * acc.train_flops_per_token, "reports": 5})
    assert (flops.max_steps, flops.val_every) == (10, 2)
    assert flops.train_flops == pytest.approx(flops.tokens * acc.train_flops_per_token)
    per_param = budgets.plan(cfg, {"tokens_per_param": 2, "reports": 1})
    assert per_param.max_steps == round(2 * acc.active_params / tokens_per_step)
    assert budgets.plan(cfg, {"tokens": 1, "reports": 4}).max_steps == 1, "at least one step"
    assert budgets.plan(cfg, {"tokens": 7 * tokens_per_step, "reports": 2}).max_steps == 6, "a multiple of val_every"
    assert budgets.resolve({}, cfg) == {"tokens": 4 * tokens_per_step, "reports": 4}, "the base config's tokens"


@pytest.mark.parametrize(
    "space,extra,match",
    [
        ("params: {moe.num_expert: {type: int, low: 2, high: 4}}", [], "did you mean 'moe.num_experts'"),
        ("params: {moe.num_experts: {type: int, low: 8, high: 2}}", [], "empty range"),
        ("params: {optim.lr: {type: float, low: 0, high: 1, log: true}}", [], "log-scale range needs low > 0"),
        ("params: {router: {type: categorical, choices: [top1, sinkhorm]}}", [], "unknown: sinkhorm"),
        ("params: {router.temperature: {type: float, low: 0.1, high: 1, when: {router: sinkhorn}}}", [],
         "not a parameter listed before"),
        ("params: {moe.top_k: {type: int, low: 1, high: 8}}", [], "top_k must be in [1, num_experts=4]"),
        (TOP_K, ["sampler=tpee"], "unknown sampler 'tpee'"),
        (TOP_K, ["pruner=medain"], "did you mean 'median'"),
        (TOP_K, ["sampler.n_startup=3"], "unknown option 'n_startup'"),
        (TOP_K, ["objectives=val/bpb,params_active", "pruner=median"], "single objective"),
        (TOP_K, ["top_k=2"], "moe.top_k: searched by sweep"),
        (TOP_K, ["budget.tokens=0"], "budget.tokens must be a number > 0"),
        ("param: {}", [], "unknown key 'param'"),
    ],
)
def test_an_invalid_search_space_fails_at_start(tiny, tmp_path, capsys, space, extra, match):
    assert main(tiny(write_sweep(tmp_path, space), *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists(), "nothing was started"


def test_every_shipped_sweep_is_valid_and_help_lists_them(tiny, capsys):
    from sweeps.cli import open_session

    for name in ("experts", "ratios", "routers", "lr", "efficiency", "scaling"):
        session = open_session(tiny(f"sweep={name}", "n_trials=0"))
        assert session.study.user_attrs["sweep"] == name
    scaling = open_session(tiny("sweep=scaling", "study=grid"))
    assert scaling.spec.sampler["name"] == "grid" and scaling.n_trials == 16, "a grid runs its points left"
    assert main(tiny("sweep=expert")) == 2 and "did you mean 'experts'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("experts", "ratios", "routers", "scaling", "n_jobs=", "budget.flops"))


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "grid"])
def test_every_sampler_runs_a_trial(tiny, capsys, name):
    objectives = ["objectives=val/bpb,params_active"] if name == "nsga2" else []
    assert main(tiny("sweep=lr", "n_trials=2", f"sampler={name}", "pruner=none", *objectives, *FAST)) == 0
    assert "2 COMPLETE" in capsys.readouterr().out
