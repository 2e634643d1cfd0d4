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
