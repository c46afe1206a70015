"""Config composition: order of precedence, aliases, errors that name the fix, experiment files."""
import pytest
import torch
from omegaconf import OmegaConf

from experiments.build import build_model
from experiments.cli import main_train
from experiments.config import ConfigError, choices, compose, experiment_runs, help_text


def test_defaults_are_a_small_blackmamba():
    cfg = compose([])
    assert (cfg.mixer.name, cfg.router.name, cfg.data.name) == ("mamba", "sinkhorn", "stdlib")
    assert cfg.model.n_layers == 8 and cfg.moe.num_experts == 8


def test_user_card_command_and_aliases():
    cfg = compose(["mixer=mamba", "router=sinkhorn", "experts=8"])
    assert cfg.moe.num_experts == 8
    cfg = compose(["experts=4", "top_k=2", "layers=6", "d_model=64", "lr=1e-3", "steps=7"])
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.model.n_layers, cfg.model.d_model) == (4, 2, 6, 64)
    assert cfg.optim.lr == 1e-3 and cfg.trainer.max_steps == 7


def test_precedence_file_then_dotted_then_alias():
    # a group pick and a dotted key of the same group both apply, in that order, whatever the argv order
    cfg = compose(["router.n_iters=3", "router=sinkhorn"])
    assert cfg.router.name == "sinkhorn" and cfg.router.n_iters == 3
    # a model preset overrides config.yaml; the command line overrides the preset
    cfg = compose(["model=blackmamba-1.5b", "model.d_model=64"])
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 30
    # the picked group's own schema applies: attention has n_heads, mamba does not
    assert compose(["mixer=attention", "mixer.n_heads=2"]).mixer.n_heads == 2
    with pytest.raises(ConfigError, match="mixer.n_heads"):
        compose(["mixer=mamba", "mixer.n_heads=2"])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["mixer=lstm"], "unknown mixer 'lstm'. Valid choices: attention, mamba, mamba2"),
        (["router=sinkhorm"], "did you mean 'sinkhorn'"),
        (["model=huge"], "Valid choices: .*blackmamba-1.5b"),
        (["model.d_modle=3"], "did you mean 'model.d_model'"),
        (["trainer.max_step=3"], "did you mean 'trainer.max_steps'"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["model.n_layers=2.5"], "model.n_layers"),
        (["no_equals_sign"], "expected key=value"),
        (["mixer.name=attention"], "pick a mixer with mixer=<name>"),
        (["model=../config"], "unknown model '../config'"),  # a choice is a name in conf/<group>/, never a path
        (["trainer.log_every=0"], "trainer.log_every must be >= 1"),
        (["trainer.precision=fp8"], "trainer.precision must be one of"),
        (["optim.lr=nan"], "optim.lr must be a finite number"),
        (["seed=-1"], "seed must be in"),
        (["tracking.run_name=${nope}"], "bad value for 'tracking.run_name'"),
        (["model.d_model=${oc.env:HOME}"], "bad value for 'model.d_model'"),
        (["model.d_model=[1,2"], "cannot parse the override 'model.d_model=\\[1,2'"),
        ([" =1"], "expected key=value"),
    ],
)
def test_bad_command_lines_fail_with_a_clear_message(argv, match):
    with pytest.raises(ConfigError, match=match):
        compose(argv)


def test_cli_reports_errors_in_one_line_without_traceback(capsys):
    assert main_train(["mixer=lstm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown mixer") and "Traceback" not in err


def test_help_lists_groups_and_choices(capsys):
    assert main_train(["--help"]) == 0
    out = capsys.readouterr().out
    for group in ("mixer", "router", "model", "data", "trainer", "experiment"):
        assert group in out
    assert "expert_choice" in out and "experts" in out
    assert out.strip() == help_text().strip()


def test_cfg_prints_the_resolved_config(capsys):
    assert main_train(["--cfg", "experts=4"]) == 0
    out = capsys.readouterr().out
    assert "num_experts: 4" in out and "name: sinkhorn" in out


def test_interpolations_are_resolved_once_with_the_built_in_resolvers(monkeypatch):
    monkeypatch.setenv("RUN_TAG", "ablation-3")
    cfg = compose(["tracking.run_name=${oc.env:RUN_TAG}", "tracking.experiment=${tracking.run_name}"])
    assert OmegaConf.to_yaml(cfg).count("ablation-3") == 2 and "${" not in OmegaConf.to_yaml(cfg)


def test_a_resumed_run_does_not_keep_the_early_stop_of_the_invocation_that_set_it(tmp_path):
    run_dir = tmp_path / "runs" / "abc" / "checkpoints"
    run_dir.mkdir(parents=True)
    (run_dir / "last.ckpt").write_bytes(b"")
    (run_dir.parent / "config.yaml").write_text(OmegaConf.to_yaml(compose(["trainer.stop_at_step=5", f"out_dir={tmp_path}"])))
    assert compose([f"out_dir={tmp_path}", "resume=abc"]).trainer.stop_at_step is None
    assert compose([f"out_dir={tmp_path}", "resume=abc", "trainer.stop_at_step=9"]).trainer.stop_at_step == 9


def test_config_files_cannot_import_code():
    # no key anywhere in the schema names a class or module to import
    cfg = compose([])
    flat = str(cfg)
    assert "_target_" not in flat and "import" not in flat


@pytest.mark.parametrize("name", choices("experiment"))
def test_every_experiment_file_composes_and_builds(name):
    runs = experiment_runs([f"experiment={name}"])  # a multi-run experiment: each of its arms
    for overrides in runs.values() if runs else [[]]:
        cfg = compose([f"experiment={name}", *overrides], arm=bool(runs))
        with torch.device("meta"):
            build_model(cfg, 256)
