#!/usr/bin/env bash
# The H100 benchmark as it was run through the device tool (see bench/README.md): llava-1.5-7b architecture
# with random fp16 weights, served by the real Triton 2.51 from the nvidia-pytriton wheel.
# Needs, in .device/: triton-server.tar.xz (the wheel's server tree with the 3.12 stub and nvidia_pytriton.libs)
# and wheels/ (numpy 1.26.4 for the stub, tritonclient, grpcio, protobuf for cp312).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
trap 'for f in /tmp/triton-vlm-bench-*.log; do [ -f "$f" ] && cp "$f" "$OUT/" && grep -v "^I1\|^+\|^|" "$f" | tail -40; done' EXIT
source bench/gpu_env.sh
[ -f /tmp/llava-1.5-7b-random/config.json ] || python3 - <<'PY'
import time, torch
from pathlib import Path
from triton_vlm.bench.checkpoints import save_random_llava_7b
t = time.perf_counter()
save_random_llava_7b(Path("/tmp/llava-1.5-7b-random"), torch.device("cuda"))
print(f"random llava-1.5-7b checkpoint written in {time.perf_counter() - t:.0f}s", flush=True)
PY
export TRITON_VLM_LLAVA_LOCAL_PATH=/tmp/llava-1.5-7b-random
export TRITON_VLM_LLAVA_STREAM_MAX_MODEL_LEN=${MAX_MODEL_LEN:-768}
python3 -m triton_vlm.cli.main bench --model llava --serve --concurrency 1,64 --requests ${REQUESTS:-6,192} \
  --max-tokens 128 --api ${API:-both} ${BENCH_FLAGS:-} --json "$OUT/h100-llava.json" --plot "$OUT/h100-llava.png"
