"""Decode step time of several export folders, interleaved, with ratios to the first.

Times the step graph alone (``InferenceSession.run`` on one token, no
tokenizer or sampling), so graph changes show without the generator's
per-token work; ``compare_exports.py`` times whole ``generate`` calls.
Used for the before/after table of the one-token branch (docs/benchmarks.md,
"One-token decode branch"):

    python benchmarks/step_time.py OLD_FP32 NEW_FP32 OLD_INT4 NEW_INT4
"""

from __future__ import annotations

import argparse
import statistics

from dijiang_deploy.bench.profile import interleaved_step_times
from dijiang_deploy.contract.errors import DiJiangError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="export folders; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="steps per folder per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=128, help="past position of the timed steps")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.threads < 1 or args.context < 0:
        parser.error("--rounds, --steps and --threads must be >= 1 and --context >= 0")
    try:
        times = interleaved_step_times(args.folders, args.threads, args.context, args.rounds, args.steps)
    except DiJiangError as exc:
        parser.error(str(exc))
    base = statistics.median(times[args.folders[0]])
    print(f"{'export':40s} {'median ms/step':>15s} {'min':>8s} {'first / this':>13s}")
    for folder, t in times.items():
        med = statistics.median(t)
        print(f"{folder:40s} {med:15.2f} {min(t):8.2f} {base / med:13.2f}")


if __name__ == "__main__":
    main()
