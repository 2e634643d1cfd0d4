"""benchmarks/report.py: the README table and plot from a pytest-benchmark JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import report  # noqa: E402


def _bench(variant, batch, size, median, diff):
    return {"stats": {"median": median}, "extra_info": {
        "variant": variant, "batch": batch, "size": size, "device": "test-gpu", "torch": "x", "triton": "y", "cuda": "z",
        "ms_per_megapixel": median * 1e3 / (batch * size * size / 2**20), "tflops": 1.0,
        "fraction_of_bf16_gemm_ceiling": 0.5, "bf16_gemm_ceiling_tflops": 2.0, "max_abs_diff_to_fp32_reference": diff}}


def test_table_and_plot(tmp_path):
    results = {"benchmarks": [
        _bench("reference-fp32-nchw", 1, 512, 0.30, 0.0),
        _bench("glcic_fast-auto-bf16", 1, 512, 0.10, 3e-3),
        _bench("reference-fp32-nchw", 1, 1024, 1.20, 0.0),
        _bench("glcic_fast-auto-bf16", 1, 1024, 0.30, 3e-3),
        {"stats": {"median": 1.0}, "extra_info": {}},  # another benchmark's row: ignored
    ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(results))
    rows = report.net_rows(results)
    assert len(rows) == 4
    table = report.markdown_table(rows)
    line = next(line for line in table.splitlines() if "glcic_fast-auto-bf16 | 1 | 1024^2" in line)
    assert "| 4.00x |" in line and "| 300.00 |" in line and "50%" in line
    assert report.main([str(path), "--plot", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 1000
    path.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(path)]) == 1


def _engine_round(engine, runs_on, median, diff, round_):
    return {"stats": {"median": median}, "extra_info": {
        "engine": engine, "runs_on": runs_on, "dtype": "float32", "batch": 1, "size": 512, "round": round_,
        "device": "test-cpu", "torch": "x", "onnxruntime": "1.0", "openvino": "2026.0-123-abc", "threads": 2,
        "weights": "demo", "max_abs_diff_to_fp32_reference": diff, "first_call_s": 3.5}}


def test_engines_table(tmp_path):
    """bench_engines.py's rounds: each engine's median over its rounds, against the eager
    reference on the same device."""
    results = {"benchmarks": [
        _engine_round(engine, "cpu", seconds, diff, round_)
        for round_, scale in enumerate((1.0, 1.5, 1.1))
        for engine, seconds, diff in (("eager-reference-cpu", 2.0 * scale, 0.0), ("openvino-cpu", 1.0 * scale, 3e-7))]
        + [{"stats": {"median": 1.0}, "extra_info": {}}]}
    rows = report.engine_rows(results)
    assert [r["engine"] for r in rows] == ["eager-reference-cpu", "openvino-cpu"]
    table = report.engines_table(rows)
    assert "2 threads each, median of 3 interleaved rounds" in table and "openvino 2026.0;" in table
    assert "| openvino-cpu | cpu | float32 | 1100 | 1000 | 2.00x | 3.0e-07 | 3.5 s |" in table
    path = tmp_path / "engines.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path)]) == 0
