#!/usr/bin/env bash
# The main job on embedded defaults, offline: real photos shipped by scikit-image, the default
# real model (EfficientNet-Lite0 with ImageNet weights from a pip package) -> Parquet shards,
# a FAISS index, and a search whose results are written as an HTML contact sheet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python scripts/make_demo_images.py data/demo --per-photo 8
embedx extract data/demo --out out/demo-features --normalize
embedx info out/demo-features
embedx train-head out/demo-features --out out/demo-head --val-fraction 0.25
embedx index out/demo-features --out out/demo-index --overwrite
embedx search out/demo-index data/demo/chelsea/chelsea_00000.jpg -k 5 --html out/demo-search.html
echo "open out/demo-search.html to see the query beside its neighbours"
