#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build glcic_fast, run the tests (the GPU parity tests run
# there instead of being skipped) and the benchmarks, and keep the raw results with their
# provenance (GPU, versions, commit, date) in one folder:
#
#   bash scripts/gpu_check.sh [STAGE] [RESULTS_DIR]
#
# STAGE: all (default), or one of the stages below when each command must stay short
# (each fits in about 10 minutes on an H100; every stage first (re)builds the extension):
#   tests         every test, Triton autotuning off (one config: parity, not speed), in
#                 parallel processes when pytest-xdist is installed
#   bench-net     whole-network inference, every backend (benchmarks/bench_net.py)
#   bench-layers  each layer per backend, masked MSE (bench_conv_layers.py, bench_masked_mse.py)
#   bench-other   ROI, training step, the service's throughput, the peer engines (bench_roi.py,
#                 bench_train.py, bench_serve.py, bench_engines.py: ONNX Runtime's TensorRT and
#                 CUDA providers need onnxruntime-gpu there, else they skip and say why)
# A GPU machine without a package index lacks torchfile (sdist-only on PyPI): build its
# wheel where pip works (`pip wheel --no-deps torchfile -w .whl`), carry .whl along, and
# there `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` with
# PYTHONPATH=/tmp/site before this script.
# RESULTS_DIR defaults to benchmarks/results/<date>-<gpu>. PYTHON names the interpreter that
# has torch (default python3; after scripts/setup.sh use PYTHON=.venv/bin/python).
# Afterwards commit the folder; RESULTS_DIR/table.md is the README's table and
# RESULTS_DIR/tuning.json the dispatcher's per-layer choice measured on this GPU (copy it
# to glcic_fast/ops/tuning.json once the parity tests pass).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
stage="${1:-all}"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || { echo "no CUDA GPU visible to $PY" >&2; exit 2; }
dir="${2:-benchmarks/results/$(date -u +%Y%m%d)-$gpu}"
mkdir -p "$dir"
# What the package and its tests import, checked before anything is built: a GPU machine may
# reach no package index, so a missing one must be brought along (e.g. torchfile, a single
# pure-Python file: copy it into a folder on PYTHONPATH).
"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
need = ["torch", "triton", "numpy", "cv2", "safetensors", "torchfile", "tqdm", "pytest", "pytest_benchmark",
        "skimage", "matplotlib", "ninja"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules: {', '.join(missing)} (install them or put them on PYTHONPATH)")
PYEOF
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper script
fi
# --no-deps: the interpreter's packages are used as they are (nothing is downloaded).
MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . > "$dir/build.log" 2>&1 \
  || { tail -30 "$dir/build.log"; exit 1; }
"$PY" benchmarks/provenance.py > "$dir/provenance-$stage.json"
cat "$dir/provenance-$stage.json"
rc=0

bench() {  # bench NAME FILES...: one pytest-benchmark run, its JSON and log kept
  local name=$1; shift
  "$PY" -m pytest "$@" --benchmark-only --benchmark-json="$dir/$name.json" \
    --benchmark-columns=median,iqr,rounds -q -rs 2>&1 | tee "$dir/$name.log"
  rc=$(( rc || PIPESTATUS[0] ))
}

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  # With pytest-xdist, test files run in TEST_WORKERS processes (each file whole, in order, in
  # one of them): compiling the Triton kernels' specialisations, most of this stage's time,
  # then goes on in parallel with the CPU tests. (Benchmarks always run alone.)
  par=()
  "$PY" -c "import xdist" 2>/dev/null && par=(-n "${TEST_WORKERS:-4}" --dist loadfile)
  GLCIC_FAST_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -q -rs ${par[@]+"${par[@]}"} 2>&1 | tee "$dir/tests.log"
  rc=$(( rc || PIPESTATUS[0] ))
fi
if [ "$stage" = all ] || [ "$stage" = bench-net ]; then
  bench bench_net benchmarks/bench_net.py
  "$PY" benchmarks/report.py "$dir/bench_net.json" --plot "$dir/net_ms_per_megapixel.png" | tee "$dir/table.md"
fi
if [ "$stage" = all ] || [ "$stage" = bench-layers ]; then
  bench bench_layers benchmarks/bench_conv_layers.py benchmarks/bench_masked_mse.py
  "$PY" benchmarks/make_tuning_table.py "$dir/bench_layers.json" -o "$dir/tuning.json"
fi
if [ "$stage" = all ] || [ "$stage" = bench-other ]; then
  bench bench_other benchmarks/bench_roi.py benchmarks/bench_train.py benchmarks/bench_serve.py
  bench bench_engines benchmarks/bench_engines.py
  "$PY" benchmarks/report.py "$dir/bench_engines.json" | tee "$dir/table-engines.md"
fi
echo "stage $stage: exit $rc; results in $dir"
exit $rc
