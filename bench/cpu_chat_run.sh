#!/usr/bin/env bash
# The host's share of a chat turn's first token, on this CPU: llava-1.5-7b's processor and geometry (336 px images
# in 576 rows, its tokenizer and prompt lengths) over a tiny random model (python -m triton_vlm.bench.checkpoints
# llava_geometry DIR), served three times: every cache on; the image cache off (image_cache_mb 0: each turn decodes
# and processes its image again); the prefix cache off too. Against each, the chat benchmark (triton-vlm bench
# --chat-turns 2, the server's split of each turn's TTFT from its metrics) -> $OUT/chat-{on,noimage,off}.json and
# bench/results/cpu-llava-geometry-chat.json (python -m triton_vlm.bench.summarize chat). Ratios only: a 2-core CPU's
# milliseconds say little about a GPU host's; the phases say where they go. CONVERSATIONS (12), PORT_BASE (18100).
set -euo pipefail
OUT=${OUT:-/tmp/cpu-chat} CHECKPOINT=${CHECKPOINT:-/tmp/llava-geometry} PY=${PY:-.venv/bin/python}
CONVERSATIONS=${CONVERSATIONS:-12} PORT_BASE=${PORT_BASE:-18100}
mkdir -p "$OUT"
[ -f "$CHECKPOINT/config.json" ] || $PY -m triton_vlm.bench.checkpoints llava_geometry "$CHECKPOINT"
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null; wait' EXIT
declare -A SETTINGS=([on]="" [noimage]="IMAGE_CACHE_MB=0" [off]="IMAGE_CACHE_MB=0 PREFIX_CACHING=0")
for mode in on noimage off; do
  env=()
  for setting in ${SETTINGS[$mode]}; do env+=("TRITON_VLM_LLAVA_$setting" "TRITON_VLM_LLAVA_STREAM_$setting"); done
  echo "== $mode: ${env[*]:-every cache on}"
  env "${env[@]}" TRITON_VLM_LLAVA_LOCAL_PATH="$CHECKPOINT" TRITON_VLM_LLAVA_STREAM_MAX_MODEL_LEN=2048 \
    $PY -m triton_vlm.cli.main serve --models llava --preload --http-port $PORT_BASE --grpc-port $((PORT_BASE + 1)) \
    --metrics-port $((PORT_BASE + 2)) > "$OUT/server-$mode.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do curl -sf -o /dev/null localhost:$PORT_BASE/v2/health/ready && break; sleep 1; done
  $PY -m triton_vlm.cli.main bench --model llava --url 127.0.0.1:$((PORT_BASE + 1)) --chat-turns 2 \
    --conversations "$CONVERSATIONS" --max-tokens 16 --chat-answers canned \
    --metrics-url 127.0.0.1:$((PORT_BASE + 2)) --json "$OUT/chat-$mode.json"
  kill $server && wait $server || true
  server=
done
$PY -m triton_vlm.bench.summarize chat "$OUT/chat-on.json" "$OUT/chat-off.json" \
  --image-cache-off "$OUT/chat-noimage.json" --command "CONVERSATIONS=$CONVERSATIONS bash bench/cpu_chat_run.sh" \
  --note "CPU: llava-1.5-7b's processor and geometry over a tiny random model (llava_geometry); ratios, not times" \
  --out bench/results/cpu-llava-geometry-chat.json
