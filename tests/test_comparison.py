"""experiment=router_comparison: one run per arm, then one comparison report; runs: is refused where it
makes no sense; a crashed arm is recorded FAILED and the others still train."""
from __future__ import annotations

import math
import re

import pytest
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from experiments.cli import main_train
from experiments.config import ConfigError, compose, experiment_runs
from sweeps.cli import main as main_sweep

ARMS = ["top1", "topk", "sinkhorn", "expert_choice", "aux_free"]
COLUMNS = ["final val/bpb", "load CV", "max / mean load", "router entropy", "load entropy", "slots dropped",
           "tokens without expert", "tokens/s"]


def fast(out_dir, *extra) -> list[str]:
    """A few seconds per arm on a CPU: the tiny model, two steps, one validation (which logs the utilization)."""
    return ["experiment=router_comparison", "model=tiny", "data.seq_len=16", "data.batch_size=2",
            "data.val_batches=1", "trainer.max_steps=2", "trainer.val_every=2", "trainer.log_every=1",
            "trainer.progress_bar=false", f"out_dir={out_dir}", *extra]


def results_table(report: str) -> dict[str, dict[str, str]]:
    """The report's results table: arm -> column -> cell."""
    lines = report.split("## Results", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    return {row[0].split()[0]: dict(zip(header, row)) for row in body}


def test_router_comparison_trains_every_arm_and_writes_one_report(tmp_path, capsys):
    """The comparison of CI: five tiny arms of two steps each (about 20 s on 2 cores)."""
    assert main_train(fast(tmp_path)) == 0
    out = capsys.readouterr().out
    report = tmp_path / "analysis" / "router_comparison" / "report.md"
    assert f"comparison report: {report}" in out
    assert (report.parent / "figures" / "router_comparison.png").is_file()
    table = results_table(report.read_text())
    assert list(table) == ARMS
    for arm, row in table.items():
        assert math.isfinite(float(row["final val/bpb"])), arm
        for column in COLUMNS:
            assert row[column] != "n/a", (arm, column)
        assert float(row["tokens/s"].replace(",", "")) > 0
    assert table["topk"]["settings"] == "top_k=2" and table["aux_free"]["router"] == "topk"
    assert "5 arms: the same model, data and token budget" in report.read_text()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("router_comparison")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["comparison_arm"] for r in runs) == sorted(ARMS)
    assert {r.info.status for r in runs} == {"FINISHED"} and len({r.data.tags["comparison_id"] for r in runs}) == 1
    assert {r.info.run_name for r in runs} == set(ARMS)


class RaiseInFirstStep(Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise self.error


def test_a_crashed_arm_is_failed_and_reported_while_the_others_train(tmp_path, capsys, monkeypatch):
    """sinkhorn crashes: FAILED, and top1 and topk still train. Then aux_free is stopped by SIGTERM: the
    comparison ends there (expert_choice never starts) and still writes the report of what it trained."""
    import experiments.train as train_module
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    real_train = train_module.train
    errors = {"sinkhorn": RuntimeError("injected crash in training"), "aux_free": SIGTERMException()}

    def train(cfg, callbacks=(), tags=None):
        name = cfg.tracking.run_name
        extra = [RaiseInFirstStep(errors[name])] if name in errors else []
        return real_train(cfg, [*callbacks, *extra], tags)

    monkeypatch.setattr(train_module, "train", train)
    from experiments.comparison import run_comparison

    runs = {arm: experiment_runs(["experiment=router_comparison"])[arm]
            for arm in ("top1", "sinkhorn", "topk", "aux_free", "expert_choice")}
    result = run_comparison(fast(tmp_path), runs)
    assert list(result.failed) == ["sinkhorn", "aux_free"] and "injected crash" in result.failed["sinkhorn"]
    assert result.interrupted.signal_name == "SIGTERM" and result.not_started == ["expert_choice"]
    assert "arm sinkhorn failed: RuntimeError: injected crash" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    failed = client.get_run(result.run_ids["sinkhorn"])
    assert failed.info.status == "FAILED" and "injected crash" in failed.data.tags["end_reason"]
    assert client.get_run(result.run_ids["aux_free"]).info.status == "KILLED"
    assert {client.get_run(result.run_ids[a]).info.status for a in ("top1", "topk")} == {"FINISHED"}
    text = result.report.read_text()
    assert list(results_table(text)) == ["top1", "topk"]
    assert "## Arms that did not finish" in text and re.search(r"\| sinkhorn \| \w+ \| FAILED \| RuntimeError", text)
    assert re.search(r"\| aux_free \| \w+ \| KILLED \| stopped by SIGTERM", text)


def test_runs_is_understood_by_composition_and_refused_where_it_makes_no_sense(tmp_path, capsys):
    runs = experiment_runs(["experiment=router_comparison"])
    assert list(runs) == ARMS and runs["topk"] == ["router=topk", "top_k=2"]
    assert experiment_runs(["experiment=blackmamba_small"]) == {} and experiment_runs([]) == {}
    cfg = compose(["experiment=router_comparison", *runs["aux_free"]], arm=True)
    assert "runs" not in cfg and cfg.router.name == "topk" and cfg.tracking.experiment == "router_comparison"
    with pytest.raises(ConfigError, match="trains several runs .*a single run cannot take it"):
        compose(["experiment=router_comparison"])

    def error(main, argv) -> str:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "a sweep's trials are single runs" in error(main_sweep, ["sweep=lr", *fast(tmp_path), "n_trials=0"])
    assert "resume= continues one run, not a comparison" in error(main_train, [*fast(tmp_path), "resume=last"])
    # every arm is checked before any trains: sinkhorn has no aux_loss_coef
    message = error(main_train, [*fast(tmp_path), "router.aux_loss_coef=0.1"])
    assert "arm 'top1'" not in message and "arm 'sinkhorn' (router=sinkhorn)" in message and "router.aux_loss_coef" in message
    # a command-line override reaches every arm: it cannot also be what an arm sets
    assert "router: set on the command line and by arm 'top1' (router=top1)" in error(main_train, [*fast(tmp_path), "router=sinkhorn"])
    assert "moe.top_k: set on the command line and by arm 'topk'" in error(main_train, [*fast(tmp_path), "top_k=2"])
    assert not (tmp_path / "runs").exists(), "nothing trained"


def test_cfg_prints_every_arm_and_command_line_overrides_reach_them_all(tmp_path, capsys):
    assert main_train([*fast(tmp_path), "model.d_model=48", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^# arm (\w+)$", out, flags=re.M) == ARMS
    assert out.count("d_model: 48") == len(ARMS) and out.count("experiment: router_comparison") == len(ARMS)
    assert out.count("max_steps: 2") == len(ARMS)
