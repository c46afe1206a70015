"""benchmarks/bench_decode.py --smoke: every decoding kernel it sweeps, checked against its twin through Triton's
interpreter (tiny fp32 shapes), so that the GPU script cannot rot."""
from benchmarks import bench_decode


def test_bench_decode_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    best = bench_decode.main(["--smoke", "--batches", "1,20"])
    # every kernel at batch 1, the two projections on the tl.dot path at 20 rows, all within tolerance
    assert set(best) == {"in_proj", "out_proj", "gate", "expert_up", "expert_down", "x_proj", "ssm"}
    assert set(best["in_proj"]) == {"row", "dot"} and set(best["out_proj"]) == {"row", "dot"}
    log = (tmp_path / "bench_decode.log").read_text()
    assert "WRONG" not in log and "## expert_down, batch 1" in log and "## route_up, batch 1" in log
