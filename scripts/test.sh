#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, build the CUDA/TensorRT
# plugins (compile-only without a GPU), run pytest. GPU tests skip with a reason
# when no device is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export DIJIANG_PLUGIN_BUILD="$ROOT/plugins/build"
PYTHON=.venv/bin/python bash scripts/build_plugins.sh "$DIJIANG_PLUGIN_BUILD"
exec .venv/bin/python -m pytest -q "$@"
