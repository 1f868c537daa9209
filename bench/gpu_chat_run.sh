#!/usr/bin/env bash
# The prefix cache on the GPU, in one device-tool call (bench/README.md, "Chat turns and the prefix cache"):
# llava-1.5-7b (random weights, /tmp/llava-random) served twice, the prefix cache on, then off
# (TRITON_VLM_LLAVA_STREAM_PREFIX_CACHING=0); against each, the chat benchmark (triton-vlm bench --chat-turns 2:
# TTFT of each turn of conversations about one image, one at a time) and the standard streamed benchmark at 64
# clients (REPEATS runs of it, for its spread) -> $OUT/chat-on.json, chat-off.json, c64-on.json, c64-off.json, the
# servers' logs, $OUT/h100-llava-chat.json (python -m triton_vlm.bench.summarize chat) and a one-line summary.
#
#   bash bench/vllm_compare.sh checkpoint   one call carrying .device/wheels: the checkpoint, the wheels kept
#   bash bench/gpu_chat_run.sh              the next call, carrying .device/triton-server.tar.xz
#
# CONVERSATIONS (8), TURN_TOKENS (64 a turn), ANSWERS (canned: what turn 2 sends back as turn 1's answer; random
# weights answer with pieces that come back about 9x longer, see triton_vlm.bench.chat; model: theirs), REPEATS (3),
# REQUESTS (192 a c64 run), MAX_MODEL_LEN (the engine's; 1024 holds turn 2 with a canned answer, 1536 with the
# model's), CACHE_OFF (the variable that turns the cache off; the script stops where the engine has no such setting).
# TINY=1: a dry run on a CPU with the tiny llava and this checkout's .venv (set REQUESTS small).
set -euo pipefail
OUT=${OUT:-/tmp/out}
CHECKPOINT=/tmp/llava-random
CONVERSATIONS=${CONVERSATIONS:-8} TURN_TOKENS=${TURN_TOKENS:-64} ANSWERS=${ANSWERS:-canned} REPEATS=${REPEATS:-3}
REQUESTS=${REQUESTS:-192} CACHE_OFF=${CACHE_OFF:-TRITON_VLM_LLAVA_STREAM_PREFIX_CACHING=0}
mkdir -p "$OUT"
source bench/gpu_lib.sh   # keeps what this call carried in $STASH (/tmp/device); start_server, stop_server
export PYTHONUNBUFFERED=1
if [ "${TINY:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python} SERVE_FLAGS=--tiny
else
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  DEVICE_DIR=$STASH SITE=/tmp/tvlm-site source bench/gpu_env.sh
  [ -f $CHECKPOINT/config.json ] || python3 -m triton_vlm.bench.checkpoints llava $CHECKPOINT
  [ "$ANSWERS" = model ] && default_len=1536 || default_len=1024
  export TRITON_VLM_LLAVA_LOCAL_PATH=$CHECKPOINT TRITON_VLM_LLAVA_STREAM_MAX_MODEL_LEN=${MAX_MODEL_LEN:-$default_len}
fi
PY=${PY:-python3}
# A variable naming no setting is left alone by the config reader: the "off" server would quietly be the "on" one.
key=${CACHE_OFF%%=*} && key=${key#TRITON_VLM_LLAVA_STREAM_} && key=${key,,}
$PY -c "import dataclasses, sys; from triton_vlm.config.schema import EngineConfig
sys.exit('$key' not in {f.name for f in dataclasses.fields(EngineConfig)})" \
  || { echo "EngineConfig has no setting $key: $CACHE_OFF would change nothing"; exit 1; }
trap 'stop_server' EXIT
levels=$(printf '64,%.0s' $(seq "$REPEATS"))

for cache in on off; do
  settings=()
  [ $cache = off ] && settings=("$CACHE_OFF")
  echo "== cache $cache: serving (${settings[*]:-defaults}) at ${SECONDS}s"
  start_server "$OUT/server-$cache.log" "${settings[@]}" \
    || { grep -v "^I1\|^+\|^|" "$OUT/server-$cache.log" | tail -30; exit 1; }
  echo "== cache $cache: chat at ${SECONDS}s"
  $PY -m triton_vlm.cli.main bench --model llava --url 127.0.0.1:$((PORT_BASE + 1)) --chat-turns 2 \
    --conversations "$CONVERSATIONS" --max-tokens "$TURN_TOKENS" --chat-answers "$ANSWERS" \
    --metrics-url 127.0.0.1:$((PORT_BASE + 2)) --json "$OUT/chat-$cache.json"
  echo "== cache $cache: c64 x$REPEATS at ${SECONDS}s"
  $PY -m triton_vlm.cli.main bench --model llava --url 127.0.0.1:$((PORT_BASE + 1)) --no-baseline \
    --concurrency "${levels%,}" --requests "$REQUESTS" --max-tokens 128 --api stream --json "$OUT/c64-$cache.json"
  stop_server
done

echo "== done at ${SECONDS}s"
command="CONVERSATIONS=$CONVERSATIONS TURN_TOKENS=$TURN_TOKENS ANSWERS=$ANSWERS REPEATS=$REPEATS REQUESTS=$REQUESTS"
$PY -m triton_vlm.bench.summarize chat "$OUT/chat-on.json" "$OUT/chat-off.json" --c64-on "$OUT/c64-on.json" \
  --c64-off "$OUT/c64-off.json" --command "$command bash bench/gpu_chat_run.sh" --out "$OUT/h100-llava-chat.json" \
  --note "cache off: $CACHE_OFF; engine max_model_len ${TRITON_VLM_LLAVA_STREAM_MAX_MODEL_LEN:-default}"
