#!/usr/bin/env bash
# One visit to a lent GPU machine, as one prepared command. Here first:
#     bash ../shared/gpu/prepare.sh          # packs Ray and the wheels into .gpuwork/
# then with the device tool, from the project root there:
#     run  carry=[".gpuwork"]  timeout_s=540  command="bash benchmarks/gpu/visit.sh"
# It runs the CUDA IPC tests that need a GPU (tests/test_cuda_ipc_gpu.py,
# with the CPU ones beside them), then the GPU benchmark script; both
# write into $OUT (gpu_out/ without one), which comes back: copy
# $OUT/gpu_bench.json to benchmarks/results/gpu_bench.json and update
# docs/benchmarks.md, "GPU". Exit status: non-zero if either failed (the
# other still ran).
set -uo pipefail
source .gpuwork/setup.sh
OUT=${OUT:-gpu_out}
export OUT
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ipc.py tests/test_cuda_ipc_gpu.py 2>&1 | tee "$OUT/cuda_ipc_tests.txt"
tests=${PIPESTATUS[0]}
timeout 390 python3 benchmarks/gpu/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "tests: exit $tests; gpu_bench: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
