# syntax=docker/dockerfile:1
# triton-vlm on NVIDIA's Triton Inference Server image. Triton 2.51 is container release 24.10
# (CUDA 12.6, Ubuntu 22.04, Python 3.10). The container runs our launcher (`triton-vlm serve`) over the
# image's own server tree, /opt/tritonserver, whose Python backend keeps its stub in backends/python.
#   docker build -t triton-vlm .                 # GPU image (CUDA torch)
#   docker build -t triton-vlm-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Inside, TRITON_VLM_TRITON_HOME points the launcher at /opt/tritonserver instead of the nvidia-pytriton wheel.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# torch built for CUDA 12.6, the image's CUDA (its driver requirement matches the image's).
ARG TORCH_VERSION=2.9.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TRITON_VLM_TRITON_HOME=/opt/tritonserver \
    TRITON_VLM_MODEL_REPOSITORY=/opt/triton-vlm/triton_models \
    TRITON_VLM_CACHE=/cache/triton-vlm \
    HF_HOME=/cache/huggingface \
    HOME=/home/triton-server

WORKDIR /opt/triton-vlm

# The largest dependency first, in its own layer, so code changes don't download it again.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY src ./src
COPY triton_models ./triton_models
# numpy<2: Triton 2.51's Python stub crashes on STRING inputs under numpy 2 (python_backend PR #384).
# The last step checks that the launcher finds the image's server and its Python backend stub.
RUN pip install --no-cache-dir "numpy>=1.26,<2" "./[openai]" \
    && mkdir -p /cache/huggingface /cache/triton-vlm "${HOME}" \
    && chown -R triton-server:triton-server /cache "${HOME}" \
    && python3 -c "from pathlib import Path; from triton_vlm.launcher.distribution import find_distribution, prepare_backend_dir; d = find_distribution(); print(d.binary, prepare_backend_dir(d, Path('/tmp')))"

# triton-server (uid/gid 1000) comes with NVIDIA's image; numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
EXPOSE 8000 8001 8002 9000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# NVIDIA's entrypoint stays; it runs this command. --instance-kind cpu for hosts without GPUs. The compose files'
# `openai` service runs `triton-vlm openai` (port 9000) from this image too.
CMD ["triton-vlm", "serve", "--host", "0.0.0.0", "--instance-kind", "gpu"]
