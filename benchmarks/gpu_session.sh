#!/usr/bin/env bash
# One GPU session's checks, in one call (the machine is lent for minutes): install the carried
# wheels (benchmarks/gpu_wheels.sh) into a scratch directory, run the extraction benchmark
# (gpu_extract.sh, under 5 minutes; ~1.5 min in sessions 15-16), a 50k-image run of resnet50, the
# GPU tests, and the CPU engine on the many cores there (bench_extract.py, cut at 150 s): ~6
# minutes in all. Each step has a time limit, so that one that hangs leaves the others their turn,
# and runs even if the one before failed; the exit code is the worst. Results and logs go to $OUT
# (default benchmarks/results).
#   bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  site="$(mktemp -d)"
  python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# embedx from this checkout (there is no install there): gpu_extract.sh sets it for itself, the
# CPU benchmark below needs it too
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_session_device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/gpu_session_device.txt"
rc=0
OUT="$OUT" timeout "${GPU_BENCH_SECONDS:-330}" bash benchmarks/gpu_extract.sh 2>&1 | tee "$OUT/gpu_extract.log" || rc=1
# a longer run of resnet50's two main paths (start-up and the last batches weigh less: 1.2-1.4x the
# 20k figures in session 15)
HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 timeout "${GPU_LONG_SECONDS:-100}" python3 benchmarks/bench_gpu.py --images 50000 \
  --models resnet50 --variants main --out "$OUT/gpu_extract_50k.json" 2>&1 | tee "$OUT/gpu_extract_50k.log" || rc=1
HF_HUB_OFFLINE=1 timeout "${GPU_TESTS_SECONDS:-90}" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
# last, and cut short if time runs out (each run's figures are printed as it ends): the CPU engine on
# this machine's many cores, CUDA hidden. Session 16 (1,024 images) saw the model run ~2x slower
# beside the default 4 decoder processes than beside 8 or none: on a run long enough for the
# decoders to stay busy, the default against 8 decoders, each with the model on every core and on
# the cores the decoders leave (OMP_NUM_THREADS)
CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 timeout "${CPU_BENCH_SECONDS:-150}" python3 benchmarks/bench_extract.py \
  --images 8192 --batch-sizes 32 --loaders auto,8:2 --model-threads auto,12 --rounds 1 \
  --out "$OUT/extract_cpu_many_cores.json" 2>&1 | tee "$OUT/extract_cpu_many_cores.log" || rc=1
exit "$rc"
