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


def _engine_round(engine, runs_on, median, diff, round_, batch=1, size=512, **macs):
    """A round of bench_engines.py; macs: direct_macs and macs_performed, which JSONs from
    before them lack."""
    return {"stats": {"median": median}, "extra_info": {
        "engine": engine, "runs_on": runs_on, "dtype": "float32", "batch": batch, "size": size, "round": round_,
        "device": "test-cpu", "torch": "x", "onnxruntime": "1.0", "openvino": "2026.0-123-abc", "threads": 2,
        "weights": "demo", "max_abs_diff_to_fp32_reference": diff, "first_call_s": 3.5, **macs}}


#: bench_cpu_peak.py's result: 500 GFLOP/s on bench_engines.py's 2 threads
PEAK = {"stats": {"median": 0.25}, "extra_info": {
    "device": "test-cpu", "cpu_fma_peak_gflops": 500.0, "threads": 2, "isa": "avx512",
    "cpu_fma_peak_gflops_1thread": 260.0}}


def _line(table, section, engine):
    """The row of `engine` in the table section headed `section`."""
    rows = table.split(section, 1)[1].split("\n\n")[1]
    return next(line for line in rows.splitlines() if line.startswith(f"| {engine} |"))


def test_engines_table(tmp_path, capsys):
    """bench_engines.py's rounds at two shapes: each engine's median over its rounds, per
    image, against the eager reference and openvino-cpu of the same shape; GFLOP/s and the
    fraction of the FMA peak from the multiply-adds."""
    rounds = (1.0, 1.5, 1.1)  # each engine's median is its time x 1.1, its fastest round its time x 1.0
    engines = (  # engine, runs on, seconds of a call on the whole batch, max diff, multiply-adds
        ("eager-reference-cpu", "cpu", 2.0, 0.0, {"direct_macs": 1.1e11}),
        ("openvino-cpu", "cpu", 1.0, 3e-7, {"direct_macs": 1.1e11}),
        ("glcic_fast-cpu", "cpu", 0.5, 2e-6, {"direct_macs": 1.1e11, "macs_performed": 0.825e11}),
        ("glcic_fast-cuda", "cuda", 0.01, 1e-3, {"direct_macs": 1.1e11, "macs_performed": 0.825e11}))
    # two 256^2 images: half the pixels of one 512^2 image, half its multiply-adds; a call on them takes 0.4 of its
    shapes = {(1, 512): (1.0, 1.0), (2, 256): (0.4, 0.5)}  # (batch, size): (time, multiply-adds) of the 512^2 one's
    results = {"benchmarks": [
        _engine_round(engine, runs_on, seconds * scale * shapes[shape][0], diff, round_, *shape,
                      **{name: count * shapes[shape][1] for name, count in macs.items()})
        for round_, scale in enumerate(rounds)
        for shape in shapes
        for engine, runs_on, seconds, diff, macs in engines
        if shape == (1, 512) or engine != "glcic_fast-cuda"] + [PEAK, {"stats": {"median": 1.0}, "extra_info": {}}]}
    rows = report.engine_rows(results)
    assert [(r["engine"], r["batch"]) for r in rows] == [(e[0], 1) for e in engines] + [(e[0], 2) for e in engines[:3]]
    table = report.engines_table(rows, report.cpu_peak(results))
    assert "2 threads each, median of 3 interleaved rounds" in table and "openvino 2026.0;" in table
    assert "FMA peak measured: 500 GFLOP/s on 2 threads (avx512), 260 GFLOP/s on 1" in table
    assert table.index("batch 2, 256^2:") < table.index("batch 1, 512^2:")  # by size, then batch
    # 512^2: 0.55 s median, 0.5 s fastest; 4x the eager reference, 2x openvino; effective
    # 2 * 1.1e11 / 0.55 s = 400 GFLOP/s, achieved 2 * 0.825e11 / 0.55 s = 300 GFLOP/s, 60% of 500
    assert (_line(table, "batch 1, 512^2:", "glcic_fast-cpu")
            == "| glcic_fast-cpu | cpu | float32 | 550 | 500 | 4.00x | 2.00x | 400 | 300 | 60% | 2.0e-06 | 3.5 s |")
    # openvino has no macs_performed: its fraction of the peak is effective, 200 of 500 GFLOP/s
    assert (_line(table, "batch 1, 512^2:", "openvino-cpu")
            == "| openvino-cpu | cpu | float32 | 1100 | 1000 | 2.00x | 1.00x | 200 | - | 40% | 3.0e-07 | 3.5 s |")
    # on the GPU: no eager GPU reference, no openvino and no FMA peak to compare with
    assert (_line(table, "batch 1, 512^2:", "glcic_fast-cuda")
            == "| glcic_fast-cuda | cuda | float32 | 11 | 10 | - | - | 20000 | 15000 | - | 1.0e-03 | 3.5 s |")
    # batch 2 of 256^2: a call on both images takes 0.4 x 0.55 s = 0.22 s, 110 ms per image, the
    # fastest 100 ms; effective 2 * 0.55e11 / 0.22 s = 500 GFLOP/s, achieved 375 GFLOP/s, 75% of 500
    assert (_line(table, "batch 2, 256^2:", "glcic_fast-cpu")
            == "| glcic_fast-cpu | cpu | float32 | 110 | 100 | 4.00x | 2.00x | 500 | 375 | 75% | 2.0e-06 | 3.5 s |")
    path = tmp_path / "engines.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path)]) == 0
    assert "batch 2, 256^2:" in capsys.readouterr().out
    path.write_text(json.dumps({"benchmarks": [PEAK]}))
    assert report.main([str(path)]) == 0
    assert capsys.readouterr().out.strip() == "FMA peak measured: 500 GFLOP/s on 2 threads (avx512), 260 GFLOP/s on 1"


def test_engines_table_without_macs(tmp_path):
    """A JSON from before direct_macs: the times and ratios as ever, '-' for the GFLOP/s and
    the fraction of the peak."""
    results = {"benchmarks": [
        _engine_round(engine, "cpu", seconds * scale, diff, round_)
        for round_, scale in enumerate((1.0, 1.5, 1.1))
        for engine, seconds, diff in (("eager-reference-cpu", 2.0, 0.0), ("openvino-cpu", 1.0, 3e-7))] + [PEAK]}
    table = report.engines_table(report.engine_rows(results), report.cpu_peak(results))
    assert (_line(table, "batch 1, 512^2:", "openvino-cpu")
            == "| openvino-cpu | cpu | float32 | 1100 | 1000 | 2.00x | 1.00x | - | - | - | 3.0e-07 | 3.5 s |")
    path = tmp_path / "engines.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path)]) == 0
