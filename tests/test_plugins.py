"""Plug-ins: a router or mixer in its own file, loaded from the command line or the environment, used by name."""
from __future__ import annotations

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
    monkeypatch.delenv(plugins.PLUGIN_ENV, raising=False)
    saved = {id(r): dict(r) for r in (MIXERS, ROUTERS)}
    loaded, files = dict(plugins._loaded), dict(plugins._group_files)
    plugins._loaded.clear()
    plugins._group_files.clear()
    yield
    for registry in (MIXERS, ROUTERS):
        registry.clear()
        registry.update(saved[id(registry)])
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    plugins._group_files.clear()
    plugins._group_files.update(files)


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
    import os
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
