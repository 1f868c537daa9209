# Sourced by the GPU scripts here: unpacks the wheel's Triton server tree from DEVICE_DIR (default .device/, built by
# bench/gpu_prepare.sh; see bench/README.md) and installs the client wheels for this interpreter into SITE (default
# /tmp/site); the launcher then finds the server through TRITON_VLM_* below. Serves the checkout in $PWD.
DEVICE_DIR=$(cd "${DEVICE_DIR:-.device}" && pwd)
SITE=${SITE:-/tmp/site}
tar -xJf "$DEVICE_DIR/triton-server.tar.xz" -C /tmp
# xgrammar and its dependencies (response_format only) come where .device/wheels has them: a call that carries only
# what a benchmark needs stays under the 64 MiB carry limit without them.
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" \
  "$DEVICE_DIR"/wheels/tritonclient-*.whl "$DEVICE_DIR"/wheels/grpcio-*.whl "$DEVICE_DIR"/wheels/protobuf-*.whl \
  "$DEVICE_DIR"/wheels/python_rapidjson-*.whl $(ls "$DEVICE_DIR"/wheels/{xgrammar,apache_tvm_ffi,pydantic,annotated_types,typing_inspection,typing_extensions}[-_]*.whl 2>/dev/null)
export PYTHONPATH=$SITE:$PWD/src
export TRITON_VLM_TRITON_HOME=/tmp/tritonserver TRITON_VLM_TRITON_LIBS=/tmp/tritonserver/nvidia_pytriton.libs
export TRITON_VLM_NUMPY1_WHEEL=$(ls "$DEVICE_DIR"/wheels/numpy-1.26.4-*.whl)
export TRITON_VLM_WHEELHOUSE=$DEVICE_DIR/wheels  # numpy 1 builds for the stub: ml_dtypes 0.5
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import importlib.util, torch, transformers, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'xgrammar', importlib.util.find_spec('xgrammar') is not None)"
