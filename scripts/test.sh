#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, build the CUDA/TensorRT
# plugins (compile-only without a GPU), build libdijiang and run its C tests
# (release and AddressSanitizer builds), run pytest. GPU tests skip with a reason
# when no device is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export DIJIANG_PLUGIN_BUILD="$ROOT/plugins/build"
PYTHON=.venv/bin/python bash scripts/build_plugins.sh "$DIJIANG_PLUGIN_BUILD"
export DIJIANG_NATIVE_BUILD="$ROOT/native/build"
PYTHON=.venv/bin/python bash scripts/build_native.sh --asan "$DIJIANG_NATIVE_BUILD"
exec .venv/bin/python -m pytest -q "$@"
