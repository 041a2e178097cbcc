#!/usr/bin/env bash
# GPU checks for a machine with a CUDA device: builds the kernels for the local
# GPU, runs the kernel C API tests, tests/gpu, and the kernel benchmark.
#
#   scripts/gpu_checks.sh [OUT_DIR]        (default: gpu-results)
#
# The kernels are built in $DIJIANG_GPU_BUILD (default plugins/build-gpu).
# OUT_DIR receives gpu.txt, build.log, pytest.log and junit.xml, and bench/ (results.json,
# table.md from benchmarks/gpu_kernels.py). A failed build stops the script (exit 1,
# the log's tail printed); the benchmark runs even when tests failed, and the exit
# status is that of the first failure. PYTHON picks the
# interpreter (default python3); it needs torch with CUDA, numpy, pytest and,
# for the ONNX Runtime reference, onnxruntime >= 1.24 (LinearAttention).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD="${DIJIANG_GPU_BUILD:-$ROOT/plugins/build-gpu}"
status=0
fail() { [[ $status -ne 0 ]] || status=$1; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT_DIR/gpu.txt"
ARCH="$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')" || exit 2
echo "== building libdijiang_kernels.so for sm_$ARCH"
{
    cmake -S "$ROOT/plugins" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
        -DDIJIANG_BUILD_TRT_PLUGIN="${DIJIANG_BUILD_TRT_PLUGIN:-OFF}" ${TensorRT_ROOT:+-DTensorRT_ROOT=$TensorRT_ROOT} \
        && cmake --build "$BUILD" -j "$(nproc)" && ctest --test-dir "$BUILD" --output-on-failure
} >"$OUT_DIR/build.log" 2>&1 || { tail -40 "$OUT_DIR/build.log"; exit 1; }
export DIJIANG_KERNELS_LIB="$BUILD/libdijiang_kernels.so"
[[ -f "$BUILD/libdijiang_trt_plugins.so" ]] && export DIJIANG_TRT_PLUGIN_LIB="$BUILD/libdijiang_trt_plugins.so"

echo "== tests/gpu"
(cd "$ROOT" && "$PYTHON" -m pytest tests/gpu -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/junit.xml") \
    2>&1 | tee "$OUT_DIR/pytest.log"
fail "${PIPESTATUS[0]}"

echo "== benchmarks/gpu_kernels.py"
(cd "$ROOT" && "$PYTHON" benchmarks/gpu_kernels.py --out "$OUT_DIR/bench") 2>&1 | tee "$OUT_DIR/bench.log"
fail "${PIPESTATUS[0]}"
exit "$status"
