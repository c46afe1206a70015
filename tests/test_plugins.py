"""Plug-ins: a router or mixer in its own file, loaded from the command line or the environment, used by name."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from blocks import MIXERS
from blocks.model import LM, ModelConfig
from blocks.moe import MoEConfig
from experiments import plugins
from routers import ROUTERS, build_router

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROUTER_PLUGIN = DOCS / "plugins" / "noisy_topk.py"
MIXER_PLUGIN = DOCS / "plugins" / "token_shift.py"


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Each test starts from the built-in registries and no loaded plug-in, and leaves them so."""
    monkeypatch.setenv(plugins.PLUGIN_ENV, "")  # recorded first, so loading plug-ins cannot leak it to later tests
    monkeypatch.delenv(plugins.PLUGIN_ENV)
    saved = {id(r): dict(r) for r in (MIXERS, ROUTERS)}
    loaded, files = dict(plugins._loaded), dict(plugins._group_files)
    forget_plugins(saved)
    yield saved
    forget_plugins(saved)
    plugins._loaded.update(loaded)
    plugins._group_files.update(files)


def forget_plugins(saved: dict) -> None:
    """Back to the registries in `saved` with no plug-in loaded, as a new process that was not given them."""
    for registry in (MIXERS, ROUTERS):
        registry.clear()
        registry.update(saved[id(registry)])
    plugins._loaded.clear()
    plugins._group_files.clear()
    os.environ.pop(plugins.PLUGIN_ENV, None)


def test_a_plugin_file_registers_its_router_with_its_group_file():
    assert plugins.load_plugin(ROUTER_PLUGIN) == [("router", "noisy_topk")]
    assert plugins.load_plugin(str(ROUTER_PLUGIN)) == [("router", "noisy_topk")]  # once per process
    assert plugins.group_file("router", "noisy_topk") == ROUTER_PLUGIN.with_suffix(".yaml")
    assert plugins.plugin_choices("router") == ["noisy_topk"] and plugins.plugin_choices("mixer") == []
    router = build_router("noisy_topk", 4, 2, {"noise_std": 0.0}).train()
    logits = torch.randn(6, 4)
    routing = router.route(logits)
    torch.testing.assert_close(routing.weights_TK, torch.softmax(logits, -1).topk(2).values)
    assert set(routing.aux_losses) == {"balance"}
    with pytest.raises(ValueError, match="noise_std"):
        build_router("noisy_topk", 4, 1, {"noise_std": -1.0})


def test_plugin_mixer_and_router_build_an_lm_that_decodes_recurrently():
    plugins.load_plugins([str(ROUTER_PLUGIN), str(MIXER_PLUGIN)])
    assert plugins.plugin_choices("mixer") == ["token_shift"]
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=32, d_model=16, n_layers=4, ffn_dim=32), "token_shift", {"expand": 3},
               MoEConfig(num_experts=4, top_k=2, router="noisy_topk")).eval()
    idx = torch.randint(0, 32, (2, 9))
    full, _ = model(idx)
    cache = model.allocate_cache(2, 9)
    prefix, _ = model(idx[:, :3], cache)
    steps = [model.step(idx[:, t], cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat([prefix, torch.stack(steps, 1)], 1), full, rtol=1e-5, atol=1e-5)
    later = idx.clone()
    later[:, 5:] = (later[:, 5:] + 1) % 32
    torch.testing.assert_close(model(later)[0][:, :5], full[:, :5])  # causal
    model.train()
    _, aux = model(idx)
    assert set(aux) == {"balance"}


def test_plugins_come_from_the_command_line_and_the_environment(monkeypatch, tmp_path):
    paths, rest = plugins.split_plugin_args(["--plugin", "a.py", "router=x", "--plugin=b.py", "--cfg"])
    assert paths == ["a.py", "b.py"] and rest == ["router=x", "--cfg"]
    with pytest.raises(plugins.PluginError, match="needs a Python file"):
        plugins.split_plugin_args(["router=x", "--plugin"])
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(MIXER_PLUGIN))
    assert plugins.plugin_paths([str(ROUTER_PLUGIN)]) == [str(MIXER_PLUGIN), str(ROUTER_PLUGIN)]
    added = plugins.load_plugins([str(ROUTER_PLUGIN)])
    assert added == [("mixer", "token_shift"), ("router", "noisy_topk")]
    # exported for worker processes, as absolute paths
    assert os.environ[plugins.PLUGIN_ENV].split(os.pathsep) == [str(MIXER_PLUGIN), str(ROUTER_PLUGIN)]


def test_broken_plugins_are_reported_and_leave_no_half_registration(tmp_path):
    with pytest.raises(plugins.PluginError, match="no such Python file"):
        plugins.load_plugin(tmp_path / "missing.py")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(plugins.PluginError, match="registered no mixer or router"):
        plugins.load_plugin(empty)
    broken = tmp_path / "broken.py"
    broken.write_text(ROUTER_PLUGIN.read_text() + "\nraise RuntimeError('half-way')\n")
    with pytest.raises(plugins.PluginError, match="failed to load: RuntimeError: half-way"):
        plugins.load_plugin(broken)
    assert "noisy_topk" not in ROUTERS
    clash = tmp_path / "clash.py"
    clash.write_text(ROUTER_PLUGIN.read_text().replace('register_router("noisy_topk"', 'register_router("sinkhorn"'))
    with pytest.raises(plugins.PluginError, match="'sinkhorn' is already registered by routers.sinkhorn"):
        plugins.load_plugin(clash)


def test_the_documented_example_is_the_tested_file():
    """docs/routing.md shows the example plug-in in full; it must be the file the tests run."""
    text = (DOCS / "routing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert ROUTER_PLUGIN.read_text() in blocks
    assert ROUTER_PLUGIN.with_suffix(".yaml").read_text() in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


# --- through the command lines: run.py, generate.py, sweep.py -------------------------------------------------

def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_the_readme_example_trains_through_run_py_and_its_checkpoint_names_the_plugin(tiny, tmp_path, capsys,
                                                                                      isolated_registries):
    """The README's example router (and the example mixer) end to end through run.py's entry point; the run
    records both files with their SHA-256; without them, resuming the run and generating from its checkpoint
    say which file to load, and generate.py with --plugin works."""
    from mlflow.tracking import MlflowClient

    from experiments.cli import main_generate, main_train

    argv = ["--plugin", str(ROUTER_PLUGIN), f"--plugin={MIXER_PLUGIN}", *tiny("router=noisy_topk", "mixer=token_shift",
                                                                         "router.noise_std=0.5", "top_k=2")]
    assert main_train(argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "name: noisy_topk" in (run_dir / "config.yaml").read_text() and "noise_std: 0.5" in (run_dir / "config.yaml").read_text()
    record = json.loads((run_dir / "plugins.json").read_text())
    assert [(e["path"], e["registers"]) for e in record] == [(str(ROUTER_PLUGIN), ["router:noisy_topk"]),
                                                             (str(MIXER_PLUGIN), ["mixer:token_shift"])]
    assert record[0]["sha256"] == plugins.sha256(ROUTER_PLUGIN)
    tag = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_dir.name).data.tags["plugins"]
    assert f"{ROUTER_PLUGIN} (sha256 {plugins.sha256(ROUTER_PLUGIN)})" in tag and str(MIXER_PLUGIN) in tag
    best = run_dir / "checkpoints" / "best.ckpt"
    assert main_generate([f"--plugin={ROUTER_PLUGIN}", "--plugin", str(MIXER_PLUGIN), f"ckpt={best}",
                          "max_tokens=4", "device=cpu"]) == 0
    capsys.readouterr()

    forget_plugins(isolated_registries)  # a new shell, without the plug-ins
    rc, err = run_cli(main_generate, [f"ckpt={best}", "max_tokens=4", "device=cpu"], capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "unknown mixer 'token_shift'" in err and f"--plugin {MIXER_PLUGIN}" in err
    rc, err = run_cli(main_train, [f"resume={run_dir.name}", f"out_dir={tmp_path}"], capsys)
    assert rc == 2 and f"--plugin {MIXER_PLUGIN}" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("content, match", [
    (None, "no such Python file"),
    ("raise RuntimeError('half-way')\n", "failed to load: RuntimeError: half-way"),
    ("x = 1\n", "registered no mixer or router"),
    ("SINKHORN", "'sinkhorn' is already registered by routers.sinkhorn"),
    ("AUX_FREE", "'aux_free' is a built-in choice (conf/router/aux_free.yaml)"),
])
def test_bad_plugins_fail_each_command_in_one_line(tmp_path, capsys, content, match):
    from experiments.cli import main_generate, main_train
    from sweeps.cli import main as main_sweep

    path = tmp_path / "plugin.py"
    if content in ("SINKHORN", "AUX_FREE"):
        name = content.lower()
        path.write_text(ROUTER_PLUGIN.read_text().replace('register_router("noisy_topk"', f'register_router("{name}"'))
    elif content is not None:
        path.write_text(content)
    for main, rest in ((main_train, ["--cfg"]), (main_sweep, ["sweep=lr", "n_trials=0"]), (main_generate, ["ckpt=x"])):
        rc, err = run_cli(main, ["--plugin", path, *rest, f"out_dir={tmp_path}"], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (main, err)
    assert "noisy_topk" not in ROUTERS and set(ROUTERS) >= {"sinkhorn", "topk"}  # nothing half-registered
    rc, err = run_cli(main_train, ["--cfg", "--plugin"], capsys)
    assert rc == 2 and "--plugin needs a Python file" in err


def test_a_plugin_from_the_environment_is_a_choice_and_unknown_names_list_it(tmp_path, capsys, monkeypatch):
    from experiments.cli import main_train

    monkeypatch.setenv(plugins.PLUGIN_ENV, str(ROUTER_PLUGIN))
    assert main_train(["--cfg", "router=noisy_topk", f"out_dir={tmp_path}"]) == 0
    assert "name: noisy_topk" in capsys.readouterr().out
    rc, err = run_cli(main_train, ["--cfg", "router=noisy_top", f"out_dir={tmp_path}"], capsys)
    assert rc == 2 and "noisy_topk" in err and "sinkhorn" in err  # the valid choices include the plug-in's
    rc, err = run_cli(main_train, ["--cfg", "router=noisy_topk", "router.noise_sd=1"], capsys)
    assert rc == 2 and "did you mean 'router.noise_std'" in err


def test_sweep_workers_get_the_plugins(tiny, tmp_path, monkeypatch, capsys):
    """sweep.py --plugin composes the base config with the plug-in, and its worker processes get the files in
    $BLACKMAMBA_PLUGINS (they are spawned here with Popen: captured instead of run)."""
    import subprocess

    from sweeps import cli as sweep_cli

    spawned = []

    class Worker:
        def __init__(self, args, env):
            spawned.append((args, env))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Worker)
    argv = ["--plugin", str(ROUTER_PLUGIN), *tiny("sweep=lr", "router=noisy_topk", "n_trials=2", "n_jobs=2")]
    assert sweep_cli.main(argv) == 0
    assert len(spawned) == 2
    for args, env in spawned:
        assert env[plugins.PLUGIN_ENV] == str(ROUTER_PLUGIN) and "--plugin" not in args and "router=noisy_topk" in args


def test_the_readme_shows_the_tested_example():
    """The README walks through the example router in full: it must be the file these tests run."""
    readme = (DOCS.parent / "README.md").read_text()
    assert ROUTER_PLUGIN.read_text() in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
