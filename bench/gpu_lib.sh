# Sourced by the GPU scripts that run in phases on one held machine (bench/vllm_compare.sh, bench/gpu_chat_run.sh).
# On sourcing: keeps what this device-tool call carried (.device/wheels, .device/triton-server.tar.xz) in $STASH
# (/tmp/device) for the calls after it: one call carries at most 64 MiB, and /tmp lasts while the machine is held.
#   start_server LOG [VAR=VALUE...]   `triton-vlm serve --models llava --preload $SERVE_FLAGS` with those variables
#                                     on ports $PORT_BASE to +2 (18000 to 18002), in the background ($server),
#                                     logging to LOG; returns once it is ready (1 where it exits or takes 600 s)
#   stop_server                       stops it and waits for it (safe when none runs: for an EXIT trap)
STASH=${STASH:-/tmp/device}
PORT_BASE=${PORT_BASE:-18000}
mkdir -p "$STASH"
[ -d .device/wheels ] && mkdir -p $STASH/wheels && cp -n .device/wheels/*.whl $STASH/wheels/
[ -f .device/triton-server.tar.xz ] && cp -n .device/triton-server.tar.xz $STASH/
server=

start_server() {
  local log=$1
  shift
  # shellcheck disable=SC2086  # SERVE_FLAGS: several flags
  env "$@" ${PY:-python3} -m triton_vlm.cli.main serve --models llava --preload ${SERVE_FLAGS:-} \
    --http-port $PORT_BASE --grpc-port $((PORT_BASE + 1)) --metrics-port $((PORT_BASE + 2)) > "$log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    curl -sf -o /dev/null localhost:$PORT_BASE/v2/health/ready && return 0
    kill -0 $server 2>/dev/null || { echo "server exited"; server=; return 1; }
    sleep 1
  done
  echo "server not ready after 600 s"
  return 1
}

stop_server() {
  if [ -n "$server" ]; then
    kill $server 2>/dev/null || true
    wait $server 2>/dev/null || true
  fi
  server=
}
