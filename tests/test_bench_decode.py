"""benchmarks/bench_decode.py --smoke: every decoding kernel it sweeps, checked against its twin through Triton's
interpreter (tiny fp32 shapes), so that the GPU script cannot rot."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"


def test_bench_decode_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    best = bench.main(["--smoke", "--batches", "1,20"])
    # every kernel at batch 1, the two projections on the tl.dot path at 20 rows, all within tolerance
    assert set(best) == {"in_proj", "out_proj", "gate", "expert_up", "expert_down"}
    assert set(best["in_proj"]) == {"row", "dot"} and set(best["out_proj"]) == {"row", "dot"}
    log = (tmp_path / "bench_decode.log").read_text()
    assert "WRONG" not in log and "## expert_down, batch 1" in log
