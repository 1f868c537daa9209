#!/usr/bin/env bash
# Start the triton-vlm server in the foreground (Ctrl-C or SIGTERM stops it cleanly).
# First run creates .venv and installs the project. Flags go to `triton-vlm serve`:
#   --tiny  --models llava,kosmos2  --http-port N  --grpc-port N  --metrics-port N  --host ADDR
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f .venv/.installed ]; then
  echo "[triton-vlm] first run: creating .venv (a few minutes)" >&2
  make install >&2
fi
exec .venv/bin/triton-vlm serve "$@"
