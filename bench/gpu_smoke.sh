#!/usr/bin/env bash
# GPU smoke run through the device tool: tiny models on the GPU through the real Triton (see bench/gpu_smoke.py).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
trap 'cp /tmp/triton-vlm-smoke.log "$OUT/" 2>/dev/null; grep -v "^I1\|^+\|^|" /tmp/triton-vlm-smoke.log | tail -30' EXIT
source bench/gpu_env.sh
PYTHONUNBUFFERED=1 python3 bench/gpu_smoke.py
