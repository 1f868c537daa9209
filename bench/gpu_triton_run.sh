#!/usr/bin/env bash
# The H100 benchmark as it was run through the device tool (see bench/README.md): a full-size architecture with
# random fp16 weights (MODEL=llava: llava-1.5-7b, the default; kosmos2; moondream2; llava_next:
# llava-v1.6-mistral-7b; llava_onevision: llava-onevision-qwen2-7b-ov; qwen2_vl: Qwen2-VL-7B-Instruct; smolvlm:
# SmolVLM-Instruct), served by the real Triton 2.51 from the nvidia-pytriton wheel. FP8=1 serves it with fp8
# projections and KV cache (llava) or an fp8 KV cache (the others), and names the results h100-MODEL-fp8.*.
# CONCURRENCY and REQUESTS: the levels and requests per level (one number, or one per level), as triton-vlm bench
# takes them.
# Needs, in .device/: triton-server.tar.xz (the wheel's server tree with the 3.12 stub and nvidia_pytriton.libs,
# less the libpython 3.13 no 3.12 host loads) and wheels/ (numpy 1.26.4 and ml_dtypes 0.5.1 for the stub,
# tritonclient, grpcio, protobuf for cp312).
set -euo pipefail
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-llava}
mkdir -p "$OUT" /tmp/site
trap 'for f in /tmp/triton-vlm-bench-*.log; do [ -f "$f" ] && cp "$f" "$OUT/" && grep -v "^I1\|^+\|^|" "$f" | tail -40; done' EXIT
source bench/gpu_env.sh
CHECKPOINT=/tmp/$MODEL-random
[ -f $CHECKPOINT/config.json ] || python3 -m triton_vlm.bench.checkpoints $MODEL $CHECKPOINT
export TRITON_VLM_${MODEL^^}_LOCAL_PATH=$CHECKPOINT
# <model>_stream (the engine): the KV cache sized for this workload's prompt (the 336 px image's positions: llava
# 576, kosmos2 64, moondream2 730, llava_next 1,176 (a square image: a 1 x 2 grid, unpadded, + the base), qwen2_vl 144,
# smolvlm 1,377 (resized to 1536 px: 4 x 4 tiles + the global view, 81 each), llava_onevision 1,485 (the 1 x 1 grid
# of 384 px: 729 features + 27 newlines, + the base's 729)) + the text + 128 new tokens.
case $MODEL in
  moondream2|qwen2_vl) default_len=1024 ;;
  smolvlm) default_len=1664 ;;
  llava_onevision) default_len=1792 ;;
  llava_next) default_len=1408 ;;
  *) default_len=768 ;;
esac
export TRITON_VLM_${MODEL^^}_STREAM_MAX_MODEL_LEN=${MAX_MODEL_LEN:-$default_len}
NAME=h100-$MODEL
if [ "${FP8:-0}" = 1 ]; then
  NAME=$NAME-fp8
  export TRITON_VLM_${MODEL^^}_STREAM_KV_CACHE_DTYPE=fp8
  [ "$MODEL" = llava ] && export TRITON_VLM_LLAVA_STREAM_QUANTIZATION=fp8
fi
python3 -m triton_vlm.cli.main bench --model $MODEL --serve --concurrency ${CONCURRENCY:-1,64} --requests ${REQUESTS:-6,192} \
  --max-tokens 128 --api ${API:-both} ${BENCH_FLAGS:-} --json "$OUT/$NAME.json" --plot "$OUT/$NAME.png"
