#!/usr/bin/env bash
# The main job on a fresh machine: set up, convert the embedded SmolLM2-135M to
# DiJiang, fine-tune it briefly (attention transfer, CPU), export to ONNX, and
# generate text on CPU with ONNX Runtime.
#
#   bash scripts/demo.sh ["your prompt"]
#
# Outputs go to runs/ (DIJIANG_RUNS to change). Steps already done are reused.
# DIJIANG_FINETUNE_MINUTES sets the fine-tuning budget (default about 9).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
RUNS="${DIJIANG_RUNS:-$ROOT/runs}"
PROMPT="${1:-What is the capital of France?}"
DJ=.venv/bin/dijiang-deploy
mkdir -p "$RUNS"
[[ -d "$RUNS/smollm2-dijiang" ]] || "$DJ" convert --model smollm2 -o "$RUNS/smollm2-dijiang"
# About 9 minutes on 2 CPU cores by default; DIJIANG_FINETUNE_MINUTES changes it.
FT_ARGS=()
[[ -n "${DIJIANG_FINETUNE_MINUTES:-}" ]] && FT_ARGS=(--budget-minutes "$DIJIANG_FINETUNE_MINUTES")
[[ -d "$RUNS/smollm2-dijiang-ft" ]] || "$DJ" finetune "$RUNS/smollm2-dijiang" -o "$RUNS/smollm2-dijiang-ft" "${FT_ARGS[@]}"
[[ -d "$RUNS/smollm2-onnx" ]] || "$DJ" export "$RUNS/smollm2-dijiang-ft" -o "$RUNS/smollm2-onnx"
"$DJ" run "$RUNS/smollm2-onnx" --chat --prompt "$PROMPT" --max-new-tokens 64
