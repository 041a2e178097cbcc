#!/usr/bin/env bash
# Builds the DiJiang kernels and TensorRT plugin and checks them without a GPU.
#
#   scripts/build_plugins.sh [BUILD_DIR]        (default: plugins/build)
#
#   BUILD_DIR/main        kernels, libdijiang_kernels.so, libdijiang_trt_plugins.so against
#                         $TensorRT_ROOT or, when unset, the TensorRT 10.14 headers of the
#                         kernel_lens wheel; CPU tests run with ctest
#
# One build: the TensorRT headers of the kernel_lens wheel are the only ones this project's
# machines can fetch, so no other TensorRT version is compiled against here (plugins/README.md,
# "What is verified"); on a device, TensorRT_ROOT points the same build at its own headers.
#
# Environment: CMAKE_CUDA_ARCHITECTURES (default "80;86;87;89;90;110"),
# DIJIANG_BUILD_JOBS (default 2), PYTHON (used only to locate kernel_lens),
# TensorRT_ROOT (a TensorRT install; its lib/ is linked when present).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$(mkdir -p "${1:-$ROOT/plugins/build}" && cd "${1:-$ROOT/plugins/build}" && pwd)"
JOBS="${DIJIANG_BUILD_JOBS:-2}"
ARCHS="${CMAKE_CUDA_ARCHITECTURES:-80;86;87;89;90;110}"
PYTHON="${PYTHON:-python3}"

command -v nvcc >/dev/null || { echo "build_plugins.sh: nvcc not found on PATH" >&2; exit 2; }
command -v ninja >/dev/null || { echo "build_plugins.sh: ninja not found on PATH" >&2; exit 2; }

TRT_ARGS=()
if [[ -n "${TensorRT_ROOT:-}" ]]; then
    TRT_ARGS+=("-DTensorRT_ROOT=$TensorRT_ROOT")
else
    # find_spec locates the package without importing it (importing pulls in torch).
    KL_DIR="$("$PYTHON" -c 'import importlib.util, os; s = importlib.util.find_spec("kernel_lens"); print(os.path.dirname(s.origin) if s else "")')"
    if [[ -z "$KL_DIR" || ! -f "$KL_DIR/include/tensorrt/NvInferRuntime.h" ]]; then
        echo "build_plugins.sh: no TensorRT headers: set TensorRT_ROOT or install the kernel_lens wheel" >&2
        exit 2
    fi
    TRT_ARGS+=("-DTensorRT_INCLUDE_DIR=$KL_DIR/include/tensorrt")
fi

configure_build_test() {
    local dir="$1"
    shift
    echo "== configure $dir"
    cmake -S "$ROOT/plugins" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" "${TRT_ARGS[@]}" "$@" >"$dir.configure.log" 2>&1 \
        || { cat "$dir.configure.log" >&2; exit 1; }
    echo "== build $dir"
    cmake --build "$dir" -j "$JOBS"
    echo "== test $dir"
    ctest --test-dir "$dir" --output-on-failure
}

check_exports() {
    local lib="$1"
    local exports
    exports="$(nm -D --defined-only "$lib")"
    for sym in getCreators setLoggerFinder; do
        if ! grep -qE "^[0-9a-f]+ T ${sym}\$" <<<"$exports"; then
            echo "build_plugins.sh: $lib does not export $sym" >&2
            exit 1
        fi
    done
    if nm -D --undefined-only "$lib" | grep -qE ' (getPluginRegistry|getLogger)$'; then
        echo "build_plugins.sh: $lib needs libnvinfer symbols at load time" >&2
        exit 1
    fi
    echo "== $lib exports getCreators and setLoggerFinder"
}

START=$SECONDS
configure_build_test "$BUILD_DIR/main"
check_exports "$BUILD_DIR/main/libdijiang_trt_plugins.so"
# A trt10_3 folder left by older versions of this script held a build that only pretended to
# be TensorRT 10.3; remove it so nothing mistakes it for one.
rm -rf "$BUILD_DIR/trt10_3" "$BUILD_DIR/trt10_3.configure.log"
echo "== done in $((SECONDS - START)) s (CUDA architectures: $ARCHS)"
