"""Turn a trained SmolLM2 conversion into the delta the package ships, and record how it was made.

    python scripts/ship_conversion.py TRAINED_CHECKPOINT --command "$(cat runs/train/command.txt)"

Writes dijiang_deploy/data/shipped/smollm2-135m-instruct/ (replacing it), then
rebuilds the checkpoint from the base weights plus that delta, exactly as
``convert --model smollm2`` will, and records its held-out perplexity and
greedy answers (those of the shipped model, after compression) in the
manifest. Needs the fine-tune's ``finetune.json`` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACT_QUESTIONS = (
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained", type=Path)
    ap.add_argument("--command", required=True, help="the finetune command that trained it")
    ap.add_argument("--commit", help="commit it was trained at (default: HEAD)")
    args = ap.parse_args()

    import torch

    from dijiang_deploy.checkpoint import load_model
    from dijiang_deploy.convert import convert_base, convert_shipped, embedded_model_path, load_base
    from dijiang_deploy.finetune.perplexity import CHAT_QUESTIONS, evaluate, greedy_answers
    from dijiang_deploy.shipped import MANIFEST_NAME, shipped_delta, write_delta

    torch.set_num_threads(os.cpu_count() or 1)
    ft = json.loads((args.trained / "finetune.json").read_text())
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, check=True).stdout.strip()
    s2 = ft["settings"]["stage2"]
    recipe = (f"{ft['settings']['budget_minutes']:g}-minute CPU fine-tune, LoRA rank {ft['settings']['lora_rank']}, "
              f"stage 2 trains {s2['train']}" + (f", hidden-state weight {s2['hidden_weight']:g}" if s2.get("hidden_weight") else ""))
    record = {
        "recipe": recipe,
        "budget_minutes": ft["settings"]["budget_minutes"],
        "seconds": ft["seconds"],
        "hardware": f"{_cpu()}, {ft['device']}, {ft['threads']} torch threads",
        "train_tokens": ft["train_tokens"],
        "data": ft["data"],
        "stage1_steps": ft["stage1_steps"],
        "stage2_steps": ft["stage2_steps"],
        "command": args.command,
        "commit": commit,
        "trained_heldout_perplexity": ft["heldout_perplexity"],
        "settings": ft["settings"],
    }
    trained = load_model(args.trained)
    untrained = convert_base(load_base("smollm2"), progress=False)
    out = shipped_delta("smollm2")
    write_delta(trained, untrained, out, embedded_model_path("smollm2"), record, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = Path(tmp) / "shipped"
        convert_shipped("smollm2", rebuilt, progress=False)
        record["heldout_perplexity"] = evaluate(rebuilt).perplexity
        questions = FACT_QUESTIONS + CHAT_QUESTIONS
        record["greedy_answers"] = dict(zip(questions, greedy_answers(rebuilt, questions, max_new_tokens=48)))
    manifest_path = out / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["record"] = record
    tmp_path = manifest_path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_path, manifest_path)
    sizes = sum(f["bytes"] for f in manifest["files"])
    print(f"wrote {out}: {len(manifest['files'])} files, {sizes / 2**20:.1f} MiB; held-out perplexity "
          f"{record['heldout_perplexity']:.2f} (trained checkpoint: {record['trained_heldout_perplexity']:.2f})")
    for q, a in record["greedy_answers"].items():
        print(f"Q: {q}\nA: {a}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
