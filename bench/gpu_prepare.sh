#!/usr/bin/env bash
# Builds what the GPU scripts carry to the device machine (Python 3.12, no network) in .device/ (git-ignored):
#   .device/triton-server.tar.xz  the nvidia-pytriton wheel's server tree (tritonserver, the Python backend, the 3.12
#                                 stub) and its bundled libraries, less the libpython 3.13 no 3.12 host loads (~30 MB)
#   .device/wheels/               cp312 wheels the device lacks: tritonclient 2.51 (its perf_analyzer too), grpcio,
#                                 protobuf, python-rapidjson, and numpy 1.26.4 + ml_dtypes 0.5.1 for the stub's
#                                 numpy 1 overlay; xgrammar (response_format) with apache-tvm-ffi and pydantic
# Run here, once, after `make install`:   bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
site=$($PY -c "import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parents[1])")
mkdir -p .device/wheels
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/tritonserver/python_backend_stubs"
cp -a "$site/pytriton/tritonserver/"{bin,backends,caches} "$stage/tritonserver/"
cp -a "$site/pytriton/tritonserver/python_backend_stubs/3.12" "$stage/tritonserver/python_backend_stubs/"
cp -a "$site/nvidia_pytriton.libs" "$stage/tritonserver/"
rm -f "$stage"/tritonserver/nvidia_pytriton.libs/libpython3*
tar -C "$stage" -cJf .device/triton-server.tar.xz tritonserver
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform manylinux_2_28_x86_64 -d .device/wheels \
  numpy==1.26.4 ml_dtypes==0.5.1 tritonclient==2.51.0 "grpcio==1.67.1" "protobuf==5.28.3" "python-rapidjson==1.20" \
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 "typing-extensions==4.16.0"
ls -la .device .device/wheels
