#!/usr/bin/env bash
# Builds libdijiang (native/: shared + static), dijiang-run, the embedding
# example and the unit tests, and runs the tests with ctest.
#
#   scripts/build_native.sh [--asan] [OUT_DIR]        (default OUT_DIR: native/build)
#
#   OUT_DIR/main      the release build: libdijiang.so, libdijiang.a, dijiang-run, dj_tests, ...
#   OUT_DIR/install   `cmake --install` of it (include/, lib/, bin/)
#   OUT_DIR/example   examples/embed_c built against OUT_DIR/install with its Makefile
#   OUT_DIR/asan      with --asan (or DIJIANG_NATIVE_ASAN=1): AddressSanitizer + UBSan build; ctest runs there too
#
# The ONNX Runtime headers are fetched into OUT_DIR/main/_deps/ort on the first
# configure (native/scripts/fetch_ort_headers.sh). Environment: PYTHON (default
# .venv/bin/python, else python3: Unicode tables, fixtures, finding the onnxruntime
# and kernel_lens wheels), DIJIANG_BUILD_JOBS (default 2), DIJIANG_ORT_INCLUDE_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASAN="${DIJIANG_NATIVE_ASAN:-0}"
OUT=""
for arg in "$@"; do
    case "$arg" in
        --asan) ASAN=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) OUT="$arg" ;;
    esac
done
OUT="${OUT:-$ROOT/native/build}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
JOBS="${DIJIANG_BUILD_JOBS:-2}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
for tool in cmake c++ cc make; do
    command -v "$tool" >/dev/null || { echo "build_native.sh: $tool not found on PATH" >&2; exit 2; }
done
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi

configure_build_test() {
    local dir="$1"
    shift
    echo "== configure $dir"
    cmake -S "$ROOT/native" -B "$dir" "${GEN[@]}" "-DDIJIANG_PYTHON=$PYTHON" "$@" >"$dir.configure.log" 2>&1 \
        || { cat "$dir.configure.log" >&2; exit 1; }
    echo "== build $dir"
    cmake --build "$dir" -j "$JOBS"
    echo "== test $dir"
    ctest --test-dir "$dir" --output-on-failure -j "$JOBS"
}

START=$SECONDS
mkdir -p "$OUT/main"
configure_build_test "$OUT/main" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_INSTALL_PREFIX=$OUT/install"
cmake --install "$OUT/main" >/dev/null
echo "== example against $OUT/install"
make -s -C "$ROOT/examples/embed_c" "PREFIX=$OUT/install" "BUILD=$OUT/example"

if [[ "$ASAN" == "1" ]]; then
    mkdir -p "$OUT/asan"
    # The ORT headers of the main build are reused; the sanitizers need no ONNX Runtime.
    ORT_INC="$(sed -n 's/^DIJIANG_ORT_INCLUDE_DIR:PATH=//p' "$OUT/main/CMakeCache.txt")"
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}" \
        configure_build_test "$OUT/asan" -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1" \
        "-DCMAKE_C_FLAGS_DEBUG=-O1 -g1" "-DDIJIANG_SANITIZE=address,undefined" -DDIJIANG_BUILD_TOOLS=OFF \
        -DDIJIANG_WITH_TRT=OFF "-DDIJIANG_ORT_INCLUDE_DIR=$ORT_INC"
fi
echo "== done in $((SECONDS - START)) s: $OUT/main/libdijiang.so, $OUT/main/dijiang-run"
