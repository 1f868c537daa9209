#!/usr/bin/env bash
# Start the triton-vlm server in the foreground (Ctrl-C or SIGTERM stops it cleanly).
# First run creates .venv and installs the project. It then picks how to run (`triton-vlm start`):
#   NVIDIA GPU + Docker with the NVIDIA runtime  -> docker compose -f docker-compose.yml up
#   Docker, no GPU                               -> docker compose -f docker-compose-cpu.yml up
#   no (working) Docker                          -> the embedded tritonserver from the Python wheel
# Flags:  --mode auto|gpu|cpu|embedded  --dry-run  --tiny  --models llava,kosmos2  --preload
#         --model-id HF_ID_OR_DIR [--name NAME] [--family auto]   (one checkpoint, see docs/models.md)
#         --http-port N  --grpc-port N  --metrics-port N  --host ADDR      (see docs/deployment.md)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f .venv/.installed ]; then
  echo "[triton-vlm] first run: creating .venv (a few minutes)" >&2
  make install >&2
fi
exec .venv/bin/triton-vlm start "$@"
