"""`python -m analysis.route`: eval-mode routing of any checkpoint over any data, written as the training
report's metrics and figures."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_interop_export import tiny_model
from test_interop_released import released_config, write_released
from test_interop_tokenizers import CODE, byte_level_bpe

from analysis.route import main as route_main
from experiments.data import DataConfig, ValBatches, load_source
from experiments.export import save_export
from experiments.utilization import load_snapshot, moe_layers, record_routing

pytest.importorskip("safetensors")


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"m{i}.py").write_text("\n".join(CODE) * 20 + f"# file {i}\n")
    return folder


def test_route_report_of_a_platform_model(tmp_path, corpus):
    model, cfg = tiny_model("router=topk", "top_k=2")
    ckpt = save_export(model, OmegaConf.to_container(cfg), tmp_path / "export")
    out = tmp_path / "report"
    data = ["data=text", f"path={corpus}", "seq_len=16", "batch_size=2", "data.val_batches=3"]
    assert route_main([f"ckpt={ckpt}", *data, f"out={out}"]) == 0
    assert (out / "report.html").is_file()
    assert {p.name for p in (out / "figures").iterdir()} == {"load_heatmap.png", "coactivation.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 96 and np.isfinite(summary["loss"]) and "bits_per_byte" in summary
    assert set(summary["layers"]) == {"layer1", "layer3"}
    snap = load_snapshot(out / "utilization.npz")

    # the counters are those of the model's eval routing of the validation windows, counted directly
    src = load_source(DataConfig(name="text", path=str(corpus), seq_len=16))
    batches = ValBatches(src.val, 16, 2, 3)
    with record_routing(moe_layers(model)) as routing, torch.no_grad():
        ids = {layer: [] for layer in summary["layers"]}
        for x, _ in batches:
            model(x)
            for layer in ids:
                ids[layer].append(routing[layer].numpy())
    for layer, chunks in ids.items():
        expert_ids = np.concatenate(chunks)
        np.testing.assert_array_equal(snap[f"{layer}/tokens_per_expert"], np.bincount(expert_ids.ravel(), minlength=4))
        assert int(snap[f"{layer}/num_tokens"]) == 96 and int(snap[f"{layer}/token_counts"].sum()) == 96
        assert summary["layers"][layer]["drop_rate"] == 0.0


def test_route_report_of_a_released_model_with_its_tokenizer(tmp_path, corpus):
    folder = write_released(tmp_path / "release", released_config(vocab=320))
    byte_level_bpe(folder / "tokenizer.json")
    out = tmp_path / "report"
    argv = [f"ckpt={folder}", "data=text", f"path={corpus}", "seq_len=8", "batch_size=2", "data.val_batches=2",
            f"out={out}", "format=md"]
    assert route_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "zyphra-blackmamba" and summary["tokenizer"].endswith("tokenizer.json")
    assert set(summary["layers"]) == {"layer1", "layer3"} and summary["tokens"] == 32
    report = (out / "report.md").read_text()
    assert "Expert load" in report and "![load_heatmap](figures/load_heatmap.png)" in report


def test_stdlib_text_is_tokenized_with_a_subword_models_tokenizer(tmp_path):
    folder = write_released(tmp_path / "release", released_config(vocab=320))
    byte_level_bpe(folder / "tokenizer.json")
    out = tmp_path / "report"
    assert route_main([f"ckpt={folder}", "seq_len=16", "batch_size=1", "data.val_batches=2", f"out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"].split()[1] == "stdlib" and summary["tokens"] == 32 and summary["bits_per_byte"] > 0


def test_a_model_without_experts_and_bad_arguments(tmp_path, corpus, capsys):
    model, cfg = tiny_model("model.mlp=mlp")
    ckpt = save_export(model, OmegaConf.to_container(cfg), tmp_path / "export")
    out = tmp_path / "report"
    data = ["data=text", f"path={corpus}", "seq_len=16", "batch_size=2", "data.val_batches=1"]
    assert route_main([f"ckpt={ckpt}", *data, f"out={out}"]) == 0
    assert "no MoE layer" in (out / "report.html").read_text() and not (out / "figures").exists()
    capsys.readouterr()
    assert route_main([f"ckpt={ckpt}", "model.d_model=8"]) == 2
    assert "unknown argument 'model.d_model'" in capsys.readouterr().err
    byte_level_bpe(tmp_path / "tokenizer.json", vocab_size=290)
    small, small_cfg = tiny_model("model.vocab_size=260")
    ckpt = save_export(small, OmegaConf.to_container(small_cfg), tmp_path / "small")
    assert route_main([f"ckpt={ckpt}", *data, f"data.tokenizer={tmp_path / 'tokenizer.json'}", f"out={out}"]) == 2
    assert "outside the model's vocabulary (260)" in capsys.readouterr().err
