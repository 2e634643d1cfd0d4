#!/usr/bin/env bash
# Sets up from nothing and runs every test and (once each, untimed) every benchmark.
# Needs python3 >= 3.10; installs torch and the rest into .venv. Without a GPU the CUDA
# sources are compiled and linked (not run) and Triton kernels run on its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch setuptools wheel ninja
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/pip install -q --no-build-isolation -e ".[test]"
.venv/bin/python -m pytest tests benchmarks --benchmark-disable -q "$@"
