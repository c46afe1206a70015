"""The platform's safetensors export: round trip, conversion of a Lightning checkpoint and of a released
checkpoint (CLI), generation from an export, and refusals that name the file."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from test_interop_released import write_released

from experiments.build import build_model
from experiments.checkpoint import CheckpointError
from experiments.cli import main_generate
from experiments.config import compose
from experiments.export import main as export_main
from experiments.export import save_export
from experiments.generation import load_model

pytest.importorskip("safetensors")
IDS = torch.tensor([[1, 7, 3, 200, 42, 9, 13, 0]])


def tiny_model(*extra):
    cfg = compose(["model=tiny", "model.vocab_size=256", *extra])
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("extra", [[], ["model.pattern=[mamba,moe,attention,mlp]", "router=topk", "top_k=2"]])
def test_round_trip_is_exact(tmp_path, extra):
    model, cfg = tiny_model(*extra)
    out = save_export(model, OmegaConf.to_container(cfg), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "blackmamba-lab" and config["vocab_size"] == 256
    loaded, info = load_model(out)
    assert info["kind"] == "blackmamba-lab" and loaded.pattern == model.pattern
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_lightning_checkpoint_converts_generates_and_routes(tiny, tmp_path, capsys):
    from analysis.route import main as route_main
    from experiments.train import train

    (tmp_path / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    result = train(compose(tiny("data=text", f"path={tmp_path / 'corpus.txt'}", "trainer.max_steps=2")))
    ckpt = result.run_dir / "checkpoints" / "last.ckpt"
    assert export_main([f"ckpt={ckpt}", f"out={tmp_path / 'export'}"]) == 0
    trained, saved = load_model(ckpt)
    exported, info = load_model(tmp_path / "export")
    torch.testing.assert_close(logits(exported), logits(trained), rtol=0, atol=0)
    assert info["run_config"]["data"]["tokenizer"] == "byte"
    capsys.readouterr()
    assert main_generate([f"ckpt={tmp_path / 'export'}", "prompt=def ", "max_tokens=8", "temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    data = ["data=text", f"path={tmp_path / 'corpus.txt'}", "seq_len=16", "batch_size=2", "data.val_batches=1"]
    for ref, name in ((ckpt, "trained"), (tmp_path / "export", "exported")):
        assert route_main([f"ckpt={ref}", *data, f"out={tmp_path / name}"]) == 0
    trained_summary, exported_summary = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("trained", "exported"))
    assert trained_summary["kind"] == "lightning" and exported_summary["kind"] == "blackmamba-lab"
    assert trained_summary["layers"] == exported_summary["layers"] and trained_summary["loss"] == exported_summary["loss"]


def test_released_checkpoint_exports_to_safetensors(tmp_path):
    release = write_released(tmp_path / "release")
    (release / "tokenizer.json").write_text((tmp_path / "release" / "config.json").read_text())  # any file: copied as is
    assert export_main([f"ckpt={release}", f"out={tmp_path / 'export'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    original, _ = load_model(release)
    exported, info = load_model(tmp_path / "export")
    torch.testing.assert_close(logits(exported, IDS % 64), logits(original, IDS % 64), rtol=0, atol=0)
    assert info["run_config"]["moe"]["activation"] == "geglu"
    assert info["run_config"]["data"]["tokenizer"] == str((tmp_path / "export" / "tokenizer.json").resolve())


def test_export_cli_usage_and_errors(tmp_path, capsys):
    assert export_main(["ckpt=x"]) == 2
    assert export_main([f"ckpt={tmp_path / 'nothing'}", f"out={tmp_path / 'out'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_broken_exports_are_refused_naming_the_file(tmp_path):
    model, cfg = tiny_model()
    out = save_export(model, OmegaConf.to_container(cfg), tmp_path / "export")
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_model(out)
    other, _ = tiny_model("model.d_model=48")
    save_export(other, OmegaConf.to_container(cfg), out)  # weights of another width under the first config
    with pytest.raises(CheckpointError, match="does not fit its config.json: .*shapes that differ"):
        load_model(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="describes no checkpoint kind"):
        load_model(out / "config.json")
