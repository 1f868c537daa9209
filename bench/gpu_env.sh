# Sourced by the GPU scripts here: unpacks the wheel's Triton server tree from .device/ (see bench/README.md) and
# installs the client wheels for this interpreter; the launcher then finds the server through TRITON_VLM_* below.
tar -xJf .device/triton-server.tar.xz -C /tmp
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site \
  .device/wheels/tritonclient-*.whl .device/wheels/grpcio-*.whl .device/wheels/protobuf-*.whl .device/wheels/python_rapidjson-*.whl
export PYTHONPATH=/tmp/site:$PWD/src
export TRITON_VLM_TRITON_HOME=/tmp/tritonserver TRITON_VLM_TRITON_LIBS=/tmp/tritonserver/nvidia_pytriton.libs
export TRITON_VLM_NUMPY1_WHEEL=$(ls $PWD/.device/wheels/numpy-1.26.4-*.whl)
export TRITON_VLM_WHEELHOUSE=$PWD/.device/wheels  # numpy 1 builds for the stub: ml_dtypes 0.5
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
