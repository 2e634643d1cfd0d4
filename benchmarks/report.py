"""Turns a pytest-benchmark JSON of bench_net.py or bench_engines.py (and bench_cpu_peak.py)
into the README's tables and a plot.

    python benchmarks/report.py RESULTS.json [--plot net.png]

bench_net.py's table: one row per variant and shape, with time per image, ms per
megapixel, TFLOP/s, its fraction of the measured bf16 GEMM ceiling, the speed-up over the
eager fp32 reference of the same shape, and the max difference to that reference. The
plot: ms per megapixel against image size, one line per variant and batch, with the
arithmetic floor (FLOP per megapixel over the measured ceiling) where a ceiling was
measured. bench_engines.py's table: one section per shape (by size, then batch), one row per
engine, its time per image (the median over the interleaved rounds of a call on the whole
batch, over the batch) and fastest round, the speed-ups over the eager reference on the
same device and (CPU rows) over openvino-cpu, effective GFLOP/s (the network's
multiply-adds as direct convolution, direct_macs, 2 FLOP each, over the median), achieved
GFLOP/s (the multiply-adds the engine performs, macs_performed, fewer where Winograd
runs; glcic_fast's engines only), the fraction of the CPU's FMA peak (achieved, else
effective, over bench_cpu_peak.py's peak in the same JSON, for CPU rows on the peak's
thread count), the max difference to the fp32 reference and the untimed first call
(warm-up, compile or engine build). A JSON from before direct_macs shows '-' there. The
head line adds the measured FMA peak; a JSON of bench_cpu_peak.py alone prints that line.
"""

import argparse
import json
import sys
from collections import defaultdict

REFERENCE = "reference-fp32-nchw"


def net_rows(results: dict):
    rows = []
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "variant" not in info or "ms_per_megapixel" not in info:
            continue
        rows.append({**info, "median_s": bench["stats"]["median"]})
    return rows


def markdown_table(rows) -> str:
    reference_time = {(r["batch"], r["size"]): r["median_s"] for r in rows if r["variant"] == REFERENCE}
    lines = ["| variant | batch | size | ms / image | ms / MP | TFLOP/s | of bf16 GEMM | vs eager fp32 | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["size"], r["batch"], r["median_s"])):
        ref = reference_time.get((r["batch"], r["size"]))
        speedup = f"{ref / r['median_s']:.2f}x" if ref else "-"
        fraction = r.get("fraction_of_bf16_gemm_ceiling")
        lines.append(f"| {r['variant']} | {r['batch']} | {r['size']}^2 | {r['median_s'] * 1e3 / r['batch']:.2f} | "
                     f"{r['ms_per_megapixel']:.2f} | {r['tflops']:.2f} | {'-' if fraction is None else f'{fraction:.0%}'} | "
                     f"{speedup} | {r['max_abs_diff_to_fp32_reference']:.1e} |")
    device = rows[0]["device"] if rows else "?"
    versions = f"torch {rows[0]['torch']}, triton {rows[0].get('triton')}, CUDA {rows[0].get('cuda')}" if rows else ""
    return f"Device: {device}; {versions}\n\n" + "\n".join(lines)


def engine_rows(results: dict):
    """One row per engine and shape (batch, size) of bench_engines.py, in the order they
    ran: its info and the seconds of each timed round (a call on the whole batch)."""
    rows = {}
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "engine" in info and bench.get("stats"):
            key = (info["engine"], info["batch"], info["size"])
            rows.setdefault(key, {**info, "seconds": []})["seconds"].append(bench["stats"]["median"])
    return list(rows.values())


def cpu_peak(results: dict):
    """bench_cpu_peak.py's result (its extra_info), or None where the JSON has none."""
    return next((bench["extra_info"] for bench in results["benchmarks"]
                 if "cpu_fma_peak_gflops" in bench.get("extra_info", {})), None)


def peak_line(peak) -> str:
    return (f"FMA peak measured: {_number(peak['cpu_fma_peak_gflops'])} GFLOP/s on {peak['threads']} threads "
            f"({peak['isa']}), {_number(peak['cpu_fma_peak_gflops_1thread'])} GFLOP/s on 1")


def _median(row) -> float:
    """An engine's median over its rounds (each round's time is one call)."""
    return sorted(row["seconds"])[len(row["seconds"]) // 2]


def _number(x) -> str:
    """Whole numbers from 100 up, three significant digits below."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def engines_table(rows, peak=None) -> str:
    """One section per shape of engine_rows' rows (the columns: the module's docstring);
    peak: cpu_peak's result, or None."""
    sections = []
    for batch, size in sorted({(r["batch"], r["size"]) for r in rows}, key=lambda shape: (shape[1], shape[0])):
        shape_rows = [r for r in rows if (r["batch"], r["size"]) == (batch, size)]
        eager = {r["runs_on"]: _median(r) for r in shape_rows if r["engine"].startswith("eager-reference")}
        openvino = next((_median(r) for r in shape_rows if r["engine"] == "openvino-cpu"), None)
        lines = [f"batch {batch}, {size}^2:", "",
                 "| engine | runs on | dtype | ms / image (median) | fastest round (ms / image) | "
                 "vs eager reference | vs openvino-cpu | effective GFLOP/s | achieved GFLOP/s | of FMA peak | "
                 "max abs diff to fp32 reference | first call (untimed) |", "|---" * 12 + "|"]
        for r in shape_rows:
            median = _median(r)
            effective, achieved = (2 * r[macs] / median / 1e9 if r.get(macs) else None
                                   for macs in ("direct_macs", "macs_performed"))
            rate = achieved or effective
            on_peak_threads = peak and r["runs_on"] == "cpu" and r.get("threads") == peak["threads"]
            cells = [r["engine"], r["runs_on"], r["dtype"], _number(median * 1e3 / batch),
                     _number(min(r["seconds"]) * 1e3 / batch), _ratio(eager.get(r["runs_on"]), median),
                     _ratio(openvino, median) if r["runs_on"] == "cpu" else "-",
                     _number(effective) if effective else "-", _number(achieved) if achieved else "-",
                     f"{rate / peak['cpu_fma_peak_gflops']:.0%}" if on_peak_threads and rate else "-",
                     f"{r['max_abs_diff_to_fp32_reference']:.1e}", f"{r['first_call_s']:.1f} s"]
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    first = rows[0]
    threads = f"{first['threads']} threads each, " if first.get("threads") else ""
    head = (f"Device: {first['device']}; {threads}median of {min(len(r['seconds']) for r in rows)} interleaved "
            f"rounds; torch {first['torch']}, onnxruntime {first['onnxruntime']}, openvino "
            f"{first['openvino'].split('-')[0]}; weights: {first['weights']}")
    if peak:
        head += "\n" + peak_line(peak)
    return head + "\n\n" + "\n\n".join(sections)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, __file__.rsplit("/", 1)[0] + "/..")
    from glcic_fast.nn.architecture import completion_macs

    series = defaultdict(list)
    for r in rows:
        series[(r["variant"], r["batch"])].append((r["size"], r["ms_per_megapixel"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (variant, batch), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{variant} (batch {batch})")
    ceiling = next((r["bf16_gemm_ceiling_tflops"] for r in rows if r.get("bf16_gemm_ceiling_tflops")), None)
    if ceiling:
        sizes = sorted({r["size"] for r in rows})
        floor = [2 * completion_macs(s, s) / (s * s / 2**20) / (ceiling * 1e12) * 1e3 for s in sizes]
        ax.plot(sizes, floor, "k--", label=f"arithmetic floor at {ceiling:.0f} TFLOP/s (bf16 GEMM)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image side (pixels)")
    ax.set_ylabel("ms per megapixel")
    ax.set_title(f"GLCIC completion network, {rows[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a pytest-benchmark JSON file")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    rows, engines, peak = net_rows(results), engine_rows(results), cpu_peak(results)
    if not rows and not engines and not peak:
        print(f"{args.results} holds no timed whole-network results (was it run with --benchmark-only?)", file=sys.stderr)
        return 1
    tables = ([markdown_table(rows)] if rows else []) + ([engines_table(engines, peak)] if engines else [])
    print("\n\n".join(tables if engines or not peak else tables + [peak_line(peak)]))
    if args.plot:
        if rows:
            plot(rows, args.plot)
        else:
            print(f"no plot: {args.results} holds no whole-network (bench_net.py) results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
