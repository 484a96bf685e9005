#!/usr/bin/env bash
# The GPU checks, run on a lent NVIDIA machine (see README "GPU"): torch CUDA backend tests,
# TensorRT tests (skip where tensorrt does not import), and the tier benchmark with the torch
# backend on CUDA next to ONNX Runtime on the host CPU. Results land in $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import tensorrt" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_engine_tensorrt.py 2>&1 \
  | tail -15 | tee "$OUT/device_tests.txt"
python3 bench/tiers.py --threads 2 --repeats 20 --out "$OUT" 2>&1 | tee "$OUT/device_tiers.txt"
