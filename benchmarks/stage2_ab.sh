#!/usr/bin/env bash
# Stage-2 recipe A/B on SmolLM2-135M, one run after the other (keep the machine
# otherwise idle): today's demo recipe, MLPs frozen, and MLPs frozen plus the
# per-layer hidden-state term. Each run's held-out perplexity is in its
# finetune.json; a summary line per run goes to OUT/summary.tsv.
#
#   benchmarks/stage2_ab.sh UNTRAINED_CHECKPOINT OUT_DIR [BUDGET_MINUTES]
set -euo pipefail
SRC="$1"; OUT="$2"; BUDGET="${3:-9}"
DJ="${DJ:-.venv/bin/dijiang-deploy}"
mkdir -p "$OUT"
run() {
    local name="$1"; shift
    local start=$SECONDS
    "$DJ" finetune "$SRC" -o "$OUT/$name" --budget-minutes "$BUDGET" --lora-rank 16 -q --overwrite "$@"
    python3 - "$OUT/$name/finetune.json" "$name" "$((SECONDS - start))" "$*" >>"$OUT/summary.tsv" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("\t".join([sys.argv[2], f"{r['heldout_perplexity']:.2f}", str(r["stage1_steps"]), str(r["stage2_steps"]),
                 str(r["train_tokens"]), sys.argv[3] + " s", sys.argv[4] or "(demo recipe)"]))
PY
}
run default
run mlp-frozen --stage2-train attention
run mlp-frozen-hidden --stage2-train attention --hidden-weight 1.0
cat "$OUT/summary.tsv"
