"""Writes the dispatcher's tuning table from per-layer conv benchmarks: for each conv shape,
the backend that measured fastest.

    pytest benchmarks/bench_conv_layers.py --benchmark-only --benchmark-json=conv.json
    python benchmarks/make_tuning_table.py conv.json [-o glcic_fast/ops/tuning.json] [--merge]

Input: a pytest-benchmark JSON of benchmarks/bench_conv_layers.py. Each result's extra_info
names the op ("conv2d_bias_act" or "conv_transpose2d_bias_act"), its tuning key (the one
glcic_fast.ops.conv2d_bias_act builds, see ``tuning_key``), the backend, the batch and the input size.

Choice: for each (op, tuning key), the configurations (layer, batch, input size) that every
backend measured for that key are compared; the backend with the smallest total median
time over them wins (ties: the earlier backend in glcic_fast.ops.BACKENDS order).
Backends that measured none of those configurations are left out.

Output: ``{op: {tuning_key: backend}}`` plus a ``"_meta"`` entry (device, versions, source
file) that the dispatcher ignores. On a CUDA device the dispatcher tries the tuned backend
first and falls back to its default order (cuda, triton, torch) when the tuned one cannot
run the arguments. With --merge, entries of the existing output file for keys these
results do not cover are kept.

Where the table is read: glcic_fast/ops/tuning.json (beside dispatch.py), unless the
environment variable GLCIC_FAST_TUNING names another file, e.g.

    GLCIC_FAST_TUNING=/path/to/h100-tuning.json python my_inference.py

The table is read once per process, at the first dispatch: set the variable before that.
A table measured on one GPU model tunes that model; keep one file per GPU and point
GLCIC_FAST_TUNING at the right one elsewhere.
"""

import argparse
import json
import os
import sys
from collections import defaultdict

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "glcic_fast", "ops", "tuning.json")
BACKEND_ORDER = ("torch", "cpp", "triton", "cuda")  # glcic_fast.ops.dispatch.BACKENDS


def tuning_key(transposed: bool, in_channels: int, out_channels: int, kernel_size: int, stride: int,
               dilation: int, dtype_name: str) -> str:
    """The key glcic_fast.ops.conv2d_bias_act looks up, e.g. "conv:256:256:k3:s1:d2:bfloat16"
    (dtype_name as in str(torch.bfloat16).split('.')[-1])."""
    return (f"{'deconv' if transposed else 'conv'}:{in_channels}:{out_channels}:k{kernel_size}:s{stride}:"
            f"d{dilation}:{dtype_name}")


def measurements(results: dict):
    """(op, key, backend, config, median seconds) for every conv-layer result in the JSON."""
    rows = []
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not all(k in info for k in ("op", "tuning_key", "backend")):
            continue  # another benchmark's result
        config = (info.get("layer"), info.get("batch"), info.get("input_hw"))
        rows.append((info["op"], info["tuning_key"], info["backend"], config, bench["stats"]["median"]))
    return rows


def choose(rows):
    """{op: {key: (winner, {backend: total seconds over the common configurations})}}."""
    times = defaultdict(lambda: defaultdict(dict))  # (op, key) -> backend -> config -> median
    for op, key, backend, config, median in rows:
        times[(op, key)][backend][config] = median
    table = defaultdict(dict)
    for (op, key), per_backend in sorted(times.items()):
        common = set.intersection(*(set(configs) for configs in per_backend.values()))
        if not common:
            print(f"warning: {op} {key}: no configuration was measured by every backend "
                  f"({sorted(per_backend)}); left out", file=sys.stderr)
            continue
        common = sorted(common, key=repr)  # a fixed summation order
        totals = {b: sum(per_backend[b][c] for c in common) for b in per_backend}
        rank = {b: i for i, b in enumerate(BACKEND_ORDER)}
        winner = min(totals, key=lambda b: (totals[b], rank.get(b, len(rank))))
        table[op][key] = (winner, totals)
    return table


def _meta(results: dict, source: str) -> dict:
    infos = [b.get("extra_info", {}) for b in results.get("benchmarks", [])]
    first = next((i for i in infos if "device" in i), {})
    return {"device": first.get("device"), "torch": first.get("torch"), "cuda": first.get("cuda"),
            "triton": first.get("triton"), "source": os.path.basename(source),
            "rule": "per tuning key, the smallest total median time over the configurations every backend measured"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON of benchmarks/bench_conv_layers.py")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="where to write the table "
                        "(default: glcic_fast/ops/tuning.json)")
    parser.add_argument("--merge", action="store_true", help="keep the output file's entries for keys "
                        "the results do not cover")
    args = parser.parse_args(argv)

    with open(args.results) as f:
        results = json.load(f)
    chosen = choose(measurements(results))
    if not chosen:
        parser.error(f"{args.results} holds no conv-layer results with op / tuning_key / backend in extra_info")

    table = {}
    if args.merge and os.path.exists(args.output):
        with open(args.output) as f:
            table = {op: dict(keys) for op, keys in json.load(f).items() if op != "_meta"}
    for op, keys in chosen.items():
        for key, (winner, totals) in keys.items():
            table.setdefault(op, {})[key] = winner
            others = ", ".join(f"{b} {t * 1e3:.3f} ms" for b, t in sorted(totals.items(), key=lambda kv: kv[1]))
            print(f"{op:28s} {key:36s} -> {winner:7s} ({others})")
    table = {op: dict(sorted(keys.items())) for op, keys in sorted(table.items())}
    table["_meta"] = _meta(results, args.results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
