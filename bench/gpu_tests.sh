#!/usr/bin/env bash
# Every GPU test (tests/gpu: kernels, the engine against the batched loop and HF generate, the tiny models served
# on the GPU through the real Triton, cancellation) in one command, on a GPU host:
#
#   bash bench/gpu_tests.sh [PYTEST ARGS]
#
# With .device/ (bench/gpu_prepare.sh builds it here; carry it to the GPU machine), the Triton server tree and the
# client wheels come from there (bench/gpu_env.sh). Without it, from the environment, e.g. a `make install` venv:
# PY=.venv/bin/python bash bench/gpu_tests.sh. Where $OUT is set, a JUnit report goes there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .device/triton-server.tar.xz ]; then
  mkdir -p /tmp/site
  source bench/gpu_env.sh
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD PYTHONUNBUFFERED=1
exec "${PY:-python3}" -m pytest tests/gpu -q -p no:cacheprovider ${OUT:+--junitxml="$OUT/gpu-tests.xml"} "$@"
