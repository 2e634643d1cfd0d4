#!/usr/bin/env bash
# Sets glcic_fast up from nothing in .venv: torch, the package (editable, with its C++/CUDA
# extension) and the test tools, and Chromium for the web page's browser test (Debian's
# chromium and chromium-driver, installed with apt-get when missing and run as root). Needs
# python3 >= 3.10. Without a GPU the CUDA sources are
# compiled for Hopper (TORCH_CUDA_ARCH_LIST=9.0) and linked, not run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch setuptools wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper script
fi
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/pip install -q --no-build-isolation -e ".[test,train,serve]"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup.sh: tests/serving/test_web_page.py needs chromium and chromium-driver (apt-get install chromium chromium-driver, as root); without them it is skipped"
  fi
fi
