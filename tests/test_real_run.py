"""benchmarks/real_run.py --smoke: three presets trained through run.py's path, MLflow, and the xz reference."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

from experiments.tracking import open_store

ROOT = Path(__file__).resolve().parents[1]


def load_real_run():
    """benchmarks/ is no package: load the script by path."""
    if "real_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("real_run", ROOT / "benchmarks" / "real_run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["real_run"] = module
        spec.loader.exec_module(module)
    return sys.modules["real_run"]


def test_xz_bits_per_byte_of_repetitive_and_random_bytes():
    xz_bpb = load_real_run().xz_bpb
    assert xz_bpb(b"abc" * 10_000) < 0.1
    assert xz_bpb(os.urandom(20_000)) > 7.9  # random bytes do not compress


def test_smoke_trains_each_preset_tracked_in_mlflow_and_measures_xz(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rows, xz = load_real_run().main(["--smoke", "--out-dir", str(tmp_path / "runs")])
    assert [r["preset"] for r in rows] == ["blackmamba_small", "mamba_small", "transformer_small"]
    for r in rows:
        assert math.isfinite(r["val_bpb"]) and r["tokens"] == 2 * 4 * 32 and r["wall_s"] > 0
        assert 0 < r["params_active"] <= r["params_total"]
    assert rows[0]["params_active"] < rows[0]["params_total"]  # the MoE preset
    assert xz["val_windows_bytes"] == 2 * 4 * 33  # two batches of four windows of seq_len + 1 bytes
    assert all(0 < xz[k] < 9 for k in ("val_windows_bpb", "val_split_bpb", "corpus_prefix_bpb"))
    client = open_store(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert all(client.get_run(r["run_id"]).info.status == "FINISHED" for r in rows)
    saved = json.loads((tmp_path / "out" / "real_run.json").read_text())
    assert [r["run_id"] for r in saved["runs"]] == [r["run_id"] for r in rows]
    assert (tmp_path / "out" / "real_run_mlflow.db").is_file()
    assert "| transformer_small |" in (tmp_path / "out" / "real_run.log").read_text()


def test_steps_must_be_positive():
    with pytest.raises(SystemExit):
        load_real_run().parse_args(["--steps", "0"])
