#!/usr/bin/env bash
# The GPU checks, run on a lent NVIDIA machine (see README "GPU"): the torch CUDA backend's
# tests (CUDA graphs, concurrent engine threads, serving end to end over gRPC), the NVML
# reader against the real driver, the TensorRT tests (skip where tensorrt does not import),
# the tier benchmark (torch on CUDA with graphs and eagerly, beside ONNX Runtime on the host
# CPU) and the live scheduler served from the GPU (closed loop, budgets 30 ms and
# U(20, 100) ms). Results land in $OUT (or bench/results): device.txt (versions, tests,
# tables), tiers.json/png, live_scheduler_torch.json/png, logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
LOG="$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
python3 -c "import tensorrt" 2>&1 | tail -1 | tee -a "$LOG"
python3 -c "import torch, onnxruntime, grpc, google.protobuf as pb, tritonclient, pynvml
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'onnxruntime',
      onnxruntime.__version__, 'grpcio', grpc.__version__, 'protobuf', pb.__version__,
      'nvml driver', pynvml.nvmlInit() or pynvml.nvmlSystemGetDriverVersion())" \
  2>&1 | tee -a "$LOG"
python3 -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_build.py \
  tests/test_engine_tensorrt.py tests/test_engine_torch_cuda.py tests/test_serve_cuda.py \
  tests/test_gpu_load.py 2>&1 | tail -30 | tee -a "$LOG"
timeout 240 python3 bench/tiers.py --threads 2 --repeats 20 --out "$OUT" 2>&1 | tee -a "$LOG"
timeout 300 python3 -m bench.live_scheduler --backend torch --points 'closed-*' \
  --requests 1500 --seconds 8 --server-cpus 2,3 --client-cpus 0 --out "$OUT" 2>&1 \
  | grep -v '%|' | tee -a "$LOG"
tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls *.log 2>/dev/null) && rm -f "$OUT"/*.log
