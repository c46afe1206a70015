"""benchmarks/bench_generate.py --smoke: the GPU benchmark's code, run on the CPU so that it cannot rot."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


def test_bench_generate_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--smoke", "--batches", "1,3", "--contexts", "24,40"]) == 0
    result = json.loads((tmp_path / "bench_generate.json").read_text())
    token_checks = [c for c in result["checks"] if "greedy" in c]
    assert token_checks and all(c["greedy"] and c["sampled"] for c in token_checks)
    fused = [c for c in result["checks"] if "fused_rel_err" in c]  # run through the interpreter here
    assert len(fused) == 4 and all(c["fused_ok"] and c["fused_rel_err"] < 1e-4 for c in fused)
    timed = [r for r in result["rows"] if "tokens_per_s" in r]
    # 2 models x 2 batches x 2 samplings x (1 plain + 2 contexts)
    assert len(timed) == 24 and all(r["tokens_per_s"] > 0 for r in timed)
    assert {r["decode"] for r in timed} == {"plain", "static"}
    assert "| model | batch | context |" in (tmp_path / "bench_generate.log").read_text()
