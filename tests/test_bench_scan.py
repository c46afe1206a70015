"""benchmarks/bench_scan.py's --smoke path (every section on tiny CPU shapes under Triton's interpreter), so the
script cannot rot: its correctness checks pass, and its tile sweep runs every variant on both input layouts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_scan_smoke_runs_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scan.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "bench_scan.json").read_text())
    assert out["errors"] == []
    for name in ("scan_float32", "conv_float32"):
        assert 0 < max(out["correctness"][name].values()) < 1e-5, (name, out["correctness"][name])
    for passes in ("fwd", "fwd+bwd"):
        layouts = {s["layout"] for s in out["sweep"] if s["pass_"] == passes}
        assert layouts == {"contiguous", "mixer views"}, (passes, layouts)
    assert {t["pass_"] for t in out["timings"]} >= {"fwd", "fwd+bwd"}
