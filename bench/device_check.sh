#!/usr/bin/env bash
# The GPU checks, run on a lent NVIDIA machine (see README "GPU"): the torch CUDA backend's
# tests (CUDA graphs, concurrent engine threads, serving end to end over gRPC), the TensorRT
# tests (skip where tensorrt does not import), and the tier benchmark: torch on CUDA with
# graphs and eagerly, beside ONNX Runtime on the host CPU. Results land in $OUT (or
# bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import tensorrt" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
python3 -c "import torch, onnxruntime, grpc, google.protobuf as pb, tritonclient
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'onnxruntime',
      onnxruntime.__version__, 'grpcio', grpc.__version__, 'protobuf', pb.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_engine_tensorrt.py \
  tests/test_engine_torch_cuda.py tests/test_serve_cuda.py 2>&1 | tail -25 \
  | tee "$OUT/device_tests.txt"
python3 bench/tiers.py --threads 2 --repeats 20 --out "$OUT" 2>&1 | tee "$OUT/device_tiers.txt"
