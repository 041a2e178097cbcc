#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the project's trained DiJiang
# conversion of the embedded SmolLM2-135M (the package's base weights plus the
# shipped delta), export it to ONNX, and answer on CPU with ONNX Runtime.
#
#   bash scripts/demo.sh ["your prompt"]
#
# Outputs go to runs/ (DIJIANG_RUNS to change). Steps already done are reused.
# DIJIANG_FINETUNE_MINUTES fine-tunes the shipped conversion further for that
# many minutes (rank-16 adapters, CPU) before exporting; default: no fine-tune.
# DIJIANG_WEIGHTS=int4 exports int4 weights (2.1-2.7x faster decoding); with
# DIJIANG_FINETUNE_MINUTES the fine-tune trains through the int4 grid
# (--quant-aware int4), so the export holds exactly the checkpoint's weights.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Settings are checked before any work. The budget names folders too, so only
# a plain number is taken.
if [[ -n "${DIJIANG_FINETUNE_MINUTES:-}" && ! "$DIJIANG_FINETUNE_MINUTES" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "DIJIANG_FINETUNE_MINUTES must be a number of minutes, got '$DIJIANG_FINETUNE_MINUTES'" >&2; exit 2
fi
if [[ "${DIJIANG_WEIGHTS:-fp32}" != fp32 && "${DIJIANG_WEIGHTS:-fp32}" != int4 ]]; then
  echo "DIJIANG_WEIGHTS must be fp32 or int4, got $DIJIANG_WEIGHTS" >&2; exit 2
fi
bash scripts/setup.sh
RUNS="${DIJIANG_RUNS:-$ROOT/runs}"
PROMPT="${1:-What is the capital of France?}"
DJ=.venv/bin/dijiang-deploy
mkdir -p "$RUNS"

# Run a step unless its output folder exists; say so when reusing it, so a
# changed setting never passes silently for a redone step.
step() {
  local out="$1"; shift
  if [[ -d "$out" ]]; then
    echo "reusing $out (delete it to redo this step)" >&2
  else
    "$@"
  fi
}

step "$RUNS/smollm2-shipped" "$DJ" convert --model smollm2 -o "$RUNS/smollm2-shipped"
WEIGHTS="${DIJIANG_WEIGHTS:-fp32}"
EXPORT_ARGS=()
[[ "$WEIGHTS" == int4 ]] && EXPORT_ARGS=(--weights int4)
SUFFIX=""
[[ "$WEIGHTS" == int4 ]] && SUFFIX="-int4"
CKPT="$RUNS/smollm2-shipped"
if [[ -n "${DIJIANG_FINETUNE_MINUTES:-}" ]]; then
  # The budget names the folders, so a longer budget never reuses a shorter run.
  SUFFIX="$SUFFIX-ft${DIJIANG_FINETUNE_MINUTES}min"
  FT_ARGS=(--budget-minutes "$DIJIANG_FINETUNE_MINUTES")
  # Adapters cannot be merged onto the int4 grid; int4 trains through the grid instead.
  if [[ "$WEIGHTS" == int4 ]]; then FT_ARGS+=(--quant-aware int4); else FT_ARGS+=(--lora-rank 16); fi
  CKPT="$RUNS/smollm2-shipped$SUFFIX"
  step "$CKPT" "$DJ" finetune "$RUNS/smollm2-shipped" -o "$CKPT" "${FT_ARGS[@]}"
fi
ONNX="$RUNS/smollm2-shipped-onnx$SUFFIX"
step "$ONNX" "$DJ" export "$CKPT" -o "$ONNX" "${EXPORT_ARGS[@]}"
"$DJ" run "$ONNX" --chat --prompt "$PROMPT" --max-new-tokens 64
