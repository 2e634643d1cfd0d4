"""Turns a pytest-benchmark JSON of bench_net.py or bench_engines.py into the README's
tables and a plot.

    python benchmarks/report.py RESULTS.json [--plot net.png]

bench_net.py's table: one row per variant and shape, with time per image, ms per
megapixel, TFLOP/s, its fraction of the measured bf16 GEMM ceiling, the speed-up over the
eager fp32 reference of the same shape, and the max difference to that reference. The
plot: ms per megapixel against image size, one line per variant and batch, with the
arithmetic floor (FLOP per megapixel over the measured ceiling) where a ceiling was
measured. bench_engines.py's table: one row per engine, its median over the interleaved
rounds, the speed-up over the eager reference on the same device, the max difference to
the fp32 reference and the untimed first call (warm-up, compile or engine build).
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
    """One row per engine of bench_engines.py, in the order they ran: its info and the
    seconds of each timed round."""
    rows = {}
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "engine" in info and bench.get("stats"):
            rows.setdefault(info["engine"], {**info, "seconds": []})["seconds"].append(bench["stats"]["median"])
    return list(rows.values())


def engines_table(rows) -> str:
    median = {r["engine"]: sorted(r["seconds"])[len(r["seconds"]) // 2] for r in rows}
    eager = {r["runs_on"]: median[r["engine"]] for r in rows if r["engine"].startswith("eager-reference")}
    lines = ["| engine | runs on | dtype | ms / image (median) | fastest round | vs eager reference | "
             "max abs diff to fp32 reference | first call (untimed) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = eager.get(r["runs_on"])
        speedup = f"{ref / median[r['engine']]:.2f}x" if ref else "-"
        lines.append(f"| {r['engine']} | {r['runs_on']} | {r['dtype']} | {median[r['engine']] * 1e3:.0f} | "
                     f"{min(r['seconds']) * 1e3:.0f} | {speedup} | {r['max_abs_diff_to_fp32_reference']:.1e} | "
                     f"{r['first_call_s']:.1f} s |")
    first = rows[0]
    threads = f"{first['threads']} threads each, " if first.get("threads") else ""
    head = (f"Device: {first['device']}; batch {first['batch']}, {first['size']}^2, {threads}median of "
            f"{min(len(r['seconds']) for r in rows)} interleaved rounds; torch {first['torch']}, onnxruntime "
            f"{first['onnxruntime']}, openvino {first['openvino'].split('-')[0]}; weights: {first['weights']}")
    return head + "\n\n" + "\n".join(lines)


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
    rows, engines = net_rows(results), engine_rows(results)
    if not rows and not engines:
        print(f"{args.results} holds no timed whole-network results (was it run with --benchmark-only?)", file=sys.stderr)
        return 1
    print("\n\n".join(([markdown_table(rows)] if rows else []) + ([engines_table(engines)] if engines else [])))
    if args.plot:
        if rows:
            plot(rows, args.plot)
        else:
            print(f"no plot: {args.results} holds no whole-network (bench_net.py) results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
