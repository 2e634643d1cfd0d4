#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build glcic_fast, run every test (the GPU parity tests
# run there instead of being skipped), run the benchmark suite, and keep the raw results
# with their provenance (GPU, versions, commit, date) in one folder:
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]      (default: benchmarks/results/<date>-<gpu>)
#
# PYTHON names the interpreter that has torch (default python3; after scripts/setup.sh use
# PYTHON=.venv/bin/python). Then commit the folder and rebuild the README's table with
# `python benchmarks/report.py RESULTS_DIR/benchmarks.json`; RESULTS_DIR/tuning.json is the
# dispatcher's per-layer choice measured on this GPU (copy it to glcic_fast/ops/tuning.json).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || { echo "no CUDA GPU visible to $PY" >&2; exit 2; }
dir="${1:-benchmarks/results/$(date -u +%Y%m%d-%H%M)-$gpu}"
mkdir -p "$dir"
MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m pip install -q --no-build-isolation -e . 2>&1 | tail -20 | tee "$dir/build.log"
"$PY" benchmarks/provenance.py > "$dir/provenance.json"
cat "$dir/provenance.json"
"$PY" -m pytest tests -q -rs 2>&1 | tee "$dir/tests.log"
tests_rc=${PIPESTATUS[0]}
"$PY" -m pytest benchmarks --benchmark-only --benchmark-json="$dir/benchmarks.json" \
  --benchmark-columns=median,iqr,rounds -q -rs 2>&1 | tee "$dir/benchmarks.log"
bench_rc=${PIPESTATUS[0]}
"$PY" benchmarks/report.py "$dir/benchmarks.json" --plot "$dir/net_ms_per_megapixel.png" | tee "$dir/table.md"
# The per-layer fastest backend; copy it to glcic_fast/ops/tuning.json once the parity tests pass.
"$PY" benchmarks/make_tuning_table.py "$dir/benchmarks.json" -o "$dir/tuning.json"
echo "tests exit $tests_rc, benchmarks exit $bench_rc; results in $dir"
exit $(( tests_rc || bench_rc ))
