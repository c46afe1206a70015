"""benchmarks/bench_train.py's --smoke path (the GPU code on the CPU, tiny shapes), so the script cannot rot."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from blocks.kernels import force_triton, pytorch_reference, use_triton

ROOT = Path(__file__).resolve().parents[1]
# a line as the off-the-shelf script prints it (its format string, with its figures for the 1.5B shape)
ANCHOR_PRINT = ('print(f"{\'blackmamba mamba+moe(sinkhorn)\':34s} total    1458M active   344M  '
                'fwd+bwd   145.6 ms     112559 tok/s  6N-MFU 33.5%", flush=True)\n')


def load_bench():
    """benchmarks/ is no package: load the script by path (registered first, as its dataclasses need)."""
    if "bench_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_train"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_train"]


def test_pytorch_reference_turns_the_kernels_off_and_restores_them():
    x = torch.zeros(2)
    with force_triton():
        assert use_triton(x)
        with pytorch_reference():
            assert not use_triton(x)
        assert use_triton(x)


def test_pytorch_reference_can_turn_off_single_kernels():
    x = torch.zeros(2)
    with force_triton():
        with pytorch_reference("gate"):
            assert not use_triton(x, kernel="gate")
            assert use_triton(x, kernel="add_norm") and use_triton(x)
            with pytorch_reference("add_norm"):  # nested: both off, then gate alone again
                assert not use_triton(x, kernel="add_norm") and not use_triton(x, kernel="gate")
            assert use_triton(x, kernel="add_norm")
        assert use_triton(x, kernel="gate")
    with pytest.raises(ValueError, match="valid: add_norm"):
        with pytorch_reference("nope"):
            pass


@pytest.mark.slow  # about 30 s on 2 cores: two models, each checked, timed and trained a few steps
def test_smoke_run_checks_times_and_compares_with_the_anchor(tmp_path, monkeypatch):
    """One Mamba + MoE and one attention + MLP model (every block kind), the anchor matched by its printed line."""
    anchor = tmp_path / "anchor.py"
    anchor.write_text(ANCHOR_PRINT)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # its outputs/ folder (Lightning's default root) stays in tmp_path
    bench = load_bench()
    results = bench.main(["--smoke", "--models", "blackmamba-1.5b,transformer", "--offtheshelf", str(anchor),
                          "--ablate", "gate,cross_entropy"])
    assert [r.name for r in results] == ["blackmamba-1.5b", "transformer"]
    for r in results:
        assert r.check["kernels_match"] and r.check["loss_falls"] and r.check["cuda_graph_matches_eager"], r.check
        assert r.check["master_weights_match_eager"], r.check
        assert set(r.variants) == {"fwd+bwd", "fwd+bwd without gate", "fwd+bwd without cross_entropy",
                                   "fwd+bwd bf16 weights", "step", "step foreach AdamW", "step, CUDA graph",
                                   "step, master weights", "step, master weights, CUDA graph"}  # never compiled
        assert all(v["tokens_per_s"] > 0 for v in r.variants.values())
        assert 0 < r.params_active <= r.params_total
    assert results[0].params_active < results[0].params_total  # MoE: one expert of 8 active
    saved = json.loads((tmp_path / "bench_train.json").read_text())
    assert saved["offtheshelf_tokens_per_s"] == {"blackmamba mamba+moe(sinkhorn)": 112559.0}
    table = (tmp_path / "bench_train.log").read_text()
    assert "| blackmamba-1.5b |" in table and "| transformer |" in table


def test_an_anchor_that_hangs_is_stopped_and_its_printed_lines_kept(tmp_path, monkeypatch):
    bench = load_bench()
    anchor = tmp_path / "anchor.py"
    anchor.write_text("import time\n" + ANCHOR_PRINT + "time.sleep(60)\n")
    monkeypatch.setattr(bench, "OFFTHESHELF_TIMEOUT_S", 3)
    setup = bench.Setup(torch.device("cpu"), 2, 32, (1, 16), 0, 1, compile=False, smoke=True)
    assert bench.run_offtheshelf(str(anchor), setup) == {"blackmamba mamba+moe(sinkhorn)": 112559.0}


def test_unknown_model_is_refused_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        load_bench().parse_args(["--models", "blackmamba-9b"])
    assert "blackmamba-1.5b" in capsys.readouterr().err


def test_ablate_takes_kernel_names_or_all(capsys):
    bench = load_bench()
    assert bench.parse_args(["--ablate", "gate,add_norm"]).ablate == ("gate", "add_norm")
    assert bench.parse_args(["--ablate", "all"]).ablate == bench.KERNELS
    assert bench.parse_args([]).ablate == ()
    with pytest.raises(SystemExit):
        bench.parse_args(["--ablate", "gate,scan"])
    assert "unknown kernel(s) in --ablate: scan" in capsys.readouterr().err


def test_every_model_composes_at_its_full_size():
    """The GPU shapes compose and match the anchor's: d 1152, 30 blocks, 18 heads of 64 (nothing built)."""
    bench = load_bench()
    setup = bench.Setup(torch.device("cpu"), 8, 2048, (1, 512), 2, 5, compile=True, smoke=False)
    for name in bench.MODELS:
        cfg = bench.run_config(name, setup, steps=8)
        assert cfg.data.seq_len == 2048 and cfg.data.batch_size == 8 and cfg.model.vocab_size == 50304
        if cfg.mixer.name == "attention":
            assert cfg.model.d_model // cfg.mixer.n_heads == 64


def test_a_failing_master_weights_step_fails_the_check_and_keeps_the_other_rows(tmp_path, monkeypatch):
    from experiments.master_adamw import MasterAdamW

    def broken(self, closure=None):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(MasterAdamW, "step", broken)
    monkeypatch.chdir(tmp_path)
    bench = load_bench()
    [r] = bench.main(["--smoke", "--models", "blackmamba-1.5b"])
    assert r.check["master_weights_match_eager"] is False and r.check["cuda_graph_matches_eager"]
    assert "step, CUDA graph" in r.variants and "step, master weights" not in r.variants
    assert any("master weights failed: RuntimeError: no kernel for this" in n for n in r.notes), r.notes
