#!/usr/bin/env bash
# llava-1.5-7b (random weights) served by triton-vlm and by vLLM 0.26.0 on the same card in the same window,
# fp16 and fp8, with Triton's perf_analyzer as a witness. The device tool runs one command of at most 10 minutes
# and carries at most 64 MiB a call, and /tmp lasts only while the machine is held, so the work is in phases, one
# call each, back to back (bench/README.md, "vLLM on the same card"):
#
#   bash bench/vllm_compare.sh stash              each call carrying one .peer/vllm_carry.tar.part-* (6 calls)
#   bash bench/vllm_compare.sh install            carrying .device/wheels: installs vLLM, writes the checkpoint
#                                                 (`checkpoint` instead: the checkpoint alone, for our side only)
#   bash bench/vllm_compare.sh vllm MODES [fp8]   MODES engine, server or engine,server: vLLM's runs ->
#                                                 $OUT/vllm-MODE[-fp8].json
#   bash bench/vllm_compare.sh served [fp8]       carrying .device/triton-server.tar.xz: our server, triton-vlm
#                                                 bench (stream + infer) and perf_analyzer -> $OUT/served[-fp8].json,
#                                                 $OUT/pa[-fp8].json (API=stream, PERF_ANALYZER=0, REQUESTS=6,192,
#                                                 PROJECT=DIR to serve another checkout, TAG=-x to name its file)
# then here: python -m triton_vlm.bench.peer DIR --command "..." --out bench/results/h100-llava-vs-vllm.json
#
# Needs, built here once: .peer/ (bash ../shared/peer/fetch_bundle.sh .peer) and .device/ (bench/gpu_prepare.sh).
set -euo pipefail
OUT=${OUT:-/tmp/out}
CHECKPOINT=/tmp/llava-random
mkdir -p "$OUT"
phase=${1:?usage: vllm_compare.sh stash|install|checkpoint|vllm MODES [fp8]|served [fp8]}
shift
source bench/gpu_lib.sh   # keeps what this call carried in $STASH (/tmp/device); start_server, stop_server
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# FlashInfer is not in the carried set (shared/peer/README.md); it is only vLLM's top-k/top-p sampler, unused by
# greedy requests, whose import vLLM 0.26 otherwise does unguarded.
export VLLM_USE_FLASHINFER_SAMPLER=0

case "$phase" in
stash)
  bash .peer/install_on_device.sh stash ;;
install)
  . .peer/install_on_device.sh install
  PYTHONPATH=$PWD/src python3 -m triton_vlm.bench.checkpoints llava $CHECKPOINT
  du -sh $CHECKPOINT ;;
checkpoint)  # only our side (no vLLM): the checkpoint, and the wheels this call carried are kept
  [ -f $CHECKPOINT/config.json ] || PYTHONPATH=$PWD/src python3 -m triton_vlm.bench.checkpoints llava $CHECKPOINT
  du -sh $CHECKPOINT ;;
vllm)
  modes=${1:?engine, server or engine,server}
  flags=() && suffix=
  [ "${2:-}" = fp8 ] && flags=(--fp8) && suffix=-fp8
  for mode in ${modes//,/ }; do
    PYTHONPATH=/tmp/site python3 bench/run_vllm_llava.py --model $CHECKPOINT --load-format dummy --mode "$mode" "${flags[@]}" \
      --server-log "$OUT/vllm-server$suffix.log" --json-out "$OUT/vllm-$mode$suffix.json" 2> "$OUT/vllm-$mode$suffix.err" \
      || { tail -60 "$OUT/vllm-$mode$suffix.err"; exit 1; }
    grep -i "error\|warn" "$OUT/vllm-$mode$suffix.err" | tail -5 || true
  done ;;
served)
  suffix=
  # The engine's KV cache sized for this workload (628 prompt positions + 128), as bench/gpu_triton_run.sh does.
  export TRITON_VLM_LLAVA_LOCAL_PATH=$CHECKPOINT TRITON_VLM_LLAVA_STREAM_MAX_MODEL_LEN=768
  if [ "${1:-}" = fp8 ]; then
    suffix=-fp8
    export TRITON_VLM_LLAVA_STREAM_QUANTIZATION=fp8 TRITON_VLM_LLAVA_STREAM_KV_CACHE_DTYPE=fp8
  fi
  # PROJECT: another checkout of triton-vlm to serve (a before/after comparison in one window); default this one.
  # The client wheels go to a site of their own: /tmp/site holds vLLM's.
  here=$PWD
  cd "${PROJECT:-.}"
  DEVICE_DIR=$STASH SITE=/tmp/tvlm-site source "$here/bench/gpu_env.sh"
  trap 'stop_server; grep -v "^I1\|^+\|^|" "$OUT/server$suffix.log" | tail -30' EXIT
  start_server "$OUT/server$suffix.log"
  python3 -m triton_vlm.cli.main bench --model llava --url 127.0.0.1:18001 --no-baseline --concurrency 1,64 \
    --requests ${REQUESTS:-6,192} --max-tokens 128 --api ${API:-both} --json "$OUT/served$suffix${TAG:-}.json"
  if [ "${PERF_ANALYZER:-1}" = 1 ]; then
    python3 -m triton_vlm.bench.perf_analyzer --url 127.0.0.1:18001 --model llava --concurrency 1,64 \
      --requests 8,192 --max-tokens 128 --wheel $STASH/wheels/tritonclient-2.51.0-*.whl \
      --libs /tmp/tritonserver/nvidia_pytriton.libs --json "$OUT/pa$suffix.json"
  fi ;;
*)
  echo "unknown phase $phase" >&2; exit 2 ;;
esac
