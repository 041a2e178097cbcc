"""Decode-step time of one export at several batch sizes: how far batching can lift throughput at the graph level.

Runs the step graph directly (no engine, no sampling, no HTTP), zero state
at position ``--context``, and prints per batch size the wall time per step,
tokens/s and the ratio to batch 1, with the three operator types that take
the most kernel time. Continuous batching can approach these ratios, never
pass them.

    python benchmarks/decode_rows.py EXPORT_DIR [--rows 1,4,16,64] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dijiang_deploy.bench.measure import machine_info
from dijiang_deploy.bench.profile import profile_decode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and table.md")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    runs = [profile_decode(args.export_dir, args.threads, args.context, args.steps, rows=r) for r in rows]
    base = runs[0]["wall_ms_per_step"] / runs[0]["rows"]
    m = machine_info()
    lines = [f"Export: {args.export_dir}; CPU: {m.get('model_name', '?')}, {m.get('cpus', '?')} CPUs, "
             f"{args.threads} threads; command: `python {' '.join(sys.argv)}`", "",
             "| rows | ms per step | tokens/s | x batch 1 | top kernels (ms per step) |",
             "| ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        ms = r["wall_ms_per_step"]
        top = ", ".join(f"{o['op']} {o['ms_per_step']:.1f}" for o in r["ops"][:3])
        lines.append(f"| {r['rows']} | {ms:.1f} | {r['rows'] * 1000 / ms:.0f} | {base * r['rows'] / ms:.2f} | {top} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"machine": m, "runs": runs}, indent=2) + "\n")
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
