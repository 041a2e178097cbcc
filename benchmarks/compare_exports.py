"""Decode/prefill speed of several export folders, interleaved, with ratios to the first.

Each round runs every folder once (a 128-token prompt of the shipped held-out
text, then 64 greedy tokens through ``Generator.generate``), so a machine whose
speed drifts over minutes slows all folders alike; the median over rounds is
reported. Used for the "Speed" tables of docs/quantization.md and the flavor
table of the README:

    python benchmarks/compare_exports.py smol-fp32-traced smol-fp32 smol-int4
"""

from __future__ import annotations

import argparse
import statistics
from importlib import resources

from dijiang_deploy.runtime import Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="export folders; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    gens = {f: Generator.from_pretrained(f) for f in args.folders}
    text = resources.files("dijiang_deploy.finetune").joinpath("data/heldout.txt").read_text()
    ids = next(iter(gens.values())).tokenizer.encode(text, add_special_tokens=False)[: args.prompt_tokens]
    for gen in gens.values():  # warm-up: first-run allocations
        gen.generate(ids, max_new_tokens=4)
    decode: dict[str, list[float]] = {f: [] for f in args.folders}
    prefill: dict[str, list[float]] = {f: [] for f in args.folders}
    for _ in range(args.rounds):
        for folder, gen in gens.items():
            stats = gen.generate(ids, max_new_tokens=args.new_tokens).stats
            decode[folder].append(stats.decode_tokens_per_s)
            prefill[folder].append(stats.prefill_tokens_per_s)
    base = statistics.median(decode[args.folders[0]])
    print(f"{'export':40s} {'decode tok/s':>12s} {'vs first':>8s} {'prefill tok/s':>13s}")
    for folder in args.folders:
        d = statistics.median(decode[folder])
        print(f"{folder:40s} {d:12.1f} {d / base:8.2f} {statistics.median(prefill[folder]):13.1f}")


if __name__ == "__main__":
    main()
