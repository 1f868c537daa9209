# Sourced by the GPU scripts here: unpacks the wheel's Triton server tree from DEVICE_DIR (default .device/, built by
# bench/gpu_prepare.sh; see bench/README.md) and installs the client wheels for this interpreter into SITE (default
# /tmp/site); the launcher then finds the server through TRITON_VLM_* below. Serves the checkout in $PWD.
DEVICE_DIR=$(cd "${DEVICE_DIR:-.device}" && pwd)
SITE=${SITE:-/tmp/site}
tar -xJf "$DEVICE_DIR/triton-server.tar.xz" -C /tmp
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" \
  "$DEVICE_DIR"/wheels/tritonclient-*.whl "$DEVICE_DIR"/wheels/grpcio-*.whl "$DEVICE_DIR"/wheels/protobuf-*.whl \
  "$DEVICE_DIR"/wheels/python_rapidjson-*.whl "$DEVICE_DIR"/wheels/xgrammar-*.whl \
  "$DEVICE_DIR"/wheels/apache_tvm_ffi-*.whl "$DEVICE_DIR"/wheels/pydantic*.whl "$DEVICE_DIR"/wheels/annotated_types-*.whl \
  "$DEVICE_DIR"/wheels/typing_inspection-*.whl "$DEVICE_DIR"/wheels/typing_extensions-*.whl
export PYTHONPATH=$SITE:$PWD/src
export TRITON_VLM_TRITON_HOME=/tmp/tritonserver TRITON_VLM_TRITON_LIBS=/tmp/tritonserver/nvidia_pytriton.libs
export TRITON_VLM_NUMPY1_WHEEL=$(ls "$DEVICE_DIR"/wheels/numpy-1.26.4-*.whl)
export TRITON_VLM_WHEELHOUSE=$DEVICE_DIR/wheels  # numpy 1 builds for the stub: ml_dtypes 0.5
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, numpy, xgrammar; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
