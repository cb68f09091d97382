#!/usr/bin/env bash
# On a CUDA host: run every GPU test, then the GPU benchmark (GPU 0 to GPU 0, and to GPU 1 where
# there are two). Logs, JSON and the plot go to the folder given (default benchmarks/results).
#
#     bash benchmarks/gpu.sh [OUTPUT_DIR]
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(",".join(str(i) for i in range(min(2, torch.cuda.device_count()))))')
python3 -m pytest -q -rs -m gpu -p no:cacheprovider \
    tests/test_localhost_gpu.py tests/test_ucx_gpu.py tests/test_cross_gpu.py tests/test_serializers.py tests/test_bench.py 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 -m sidecar_core._cli bench --device cuda --gpus "$gpus" --out "$out" 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, gpu bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
