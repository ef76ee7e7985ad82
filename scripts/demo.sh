#!/usr/bin/env bash
# The main job on embedded defaults: real photos that scikit-image ships, the default real
# model (EfficientNet-Lite0, ImageNet weights from a pip package). Works offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python scripts/make_demo_images.py data/demo --per-photo 8
embedx extract data/demo --out out/demo-features --normalize
embedx info out/demo-features
