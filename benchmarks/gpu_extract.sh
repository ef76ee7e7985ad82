#!/usr/bin/env bash
# GPU extraction benchmark, one GPU, under 5 minutes: resnet50 and vit_base_patch16_224 at
# bf16 (random weights: no hub there) on ~20k generated JPEGs of ~500x375; model-only ceiling
# vs end-to-end images/s, with CPU-worker decode and with on-GPU (nvJPEG) decode; for the first
# model also the GPU-decode stage alone and both paths with --prefetch 0 (the serial baseline).
#   bash benchmarks/gpu_extract.sh            # N_IMAGES=20000 by default
# Needs torch (CUDA), timm, torchvision, pyarrow, typer, pillow, scikit-image; not faiss.
# simplejpeg too, for the CPU workers' fast JPEG path (without it PIL decodes, slower, and
# the result's env.jpeg_decoder says "PIL"): carry its wheel where there is no internet.
# TorchCodec too, to measure its GPU decoder beside torchvision's (env.device_decoders).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/bench_gpu.py --images "${N_IMAGES:-20000}" --models "${MODELS:-resnet50,vit_base_patch16_224}" \
  --out "${OUT:-benchmarks/results}/gpu_extract.json"
