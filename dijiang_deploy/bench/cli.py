"""``dijiang-deploy bench``: decode/prefill speed and memory against the usual alternatives."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..contract.errors import DiJiangError
from .systems import ALL_SYSTEMS, DIJIANG_FORMATS

#: Shorthands accepted by ``--systems``.
ALIASES = {
    "all": list(ALL_SYSTEMS),
    "dijiang-ort": [f"dijiang-ort-{f}" for f in DIJIANG_FORMATS],
    "dijiang": [f"dijiang-ort-{f}" for f in DIJIANG_FORMATS] + ["torch-recurrent"],
    "baselines": ["ort-kv-fp32", "llamacpp-q4_1"],
}
#: ``--quick`` without ``--systems``: one float and one quantized DiJiang export
#: (each tiny export costs seconds of tracing), every baseline.
QUICK_SYSTEMS = "dijiang-ort-fp32,dijiang-ort-int4,ort-kv-fp32,llamacpp-q4_1,torch-recurrent"


def parse_contexts(text: str) -> list[int]:
    """``"128,1024"`` -> ``[128, 1024]`` (positive, de-duplicated, ascending)."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise DiJiangError(f"--contexts must be comma-separated integers, got {text!r}")
    if not values or values[0] < 1:
        raise DiJiangError(f"--contexts needs positive lengths, got {text!r}")
    return values


def parse_systems(text: str) -> list[str]:
    """Comma-separated system names or aliases -> system names in report order."""
    wanted: set[str] = set()
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item in ALIASES:
            wanted.update(ALIASES[item])
        elif item in ALL_SYSTEMS:
            wanted.add(item)
        else:
            raise DiJiangError(
                f"unknown system {item!r}; choose from {', '.join(ALL_SYSTEMS)} or {', '.join(ALIASES)}"
            )
    return [s for s in ALL_SYSTEMS if s in wanted]


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark decode/prefill speed and memory against baselines",
        description=(
            "Decode tokens/s at batch 1 after a context of each length, prefill tokens/s, peak resident memory "
            "and state/KV-cache size for DiJiang on ONNX Runtime (every weight format) and the original softmax "
            "model on ONNX Runtime with a KV cache, llama.cpp (4-bit GGUF) and the PyTorch reference; plus the "
            "machine's memory bandwidth and each DiJiang row's share of its bandwidth roofline."
        ),
    )
    p.add_argument("--contexts", default=None, help="comma-separated context lengths (default 128,1024,4096,8192)")
    p.add_argument(
        "--systems",
        default=None,
        help=f"comma-separated: {', '.join(ALL_SYSTEMS)}, or aliases {', '.join(ALIASES)} "
        f"(default all; with --quick: {QUICK_SYSTEMS})",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed decode runs per context (median reported; default 5)")
    p.add_argument("--decode-steps", type=int, default=None, help="tokens per timed decode run (default 16)")
    p.add_argument("--warmup-steps", type=int, default=4, help="untimed decode steps before the timed runs")
    p.add_argument("--prefill-repeats", type=int, default=1, help="timed prefills per context (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny random model, two short contexts (CI smoke test)")
    p.add_argument("--out", default="bench-results", help="folder for table.md/.txt, results.json/.csv, plot.png")
    p.add_argument("--threads", type=int, default=0, help="threads for every runtime (default: all CPUs)")
    p.add_argument("--work-dir", help="where converted/exported models are built and reused "
                   "(default ~/.cache/dijiang-deploy/bench; a temporary folder with --quick)")
    p.add_argument("--checkpoint", help="use this DiJiang checkpoint folder instead of converting SmolLM2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--backend", default="ort", choices=["ort", "trt"], help="DiJiang runtime backend")
    p.add_argument("--no-profile", action="store_true", help="skip the ONNX Runtime profile of the decode step")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per system")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    p.add_argument(
        "--streams", default=None, metavar="N,N,...",
        help="instead: concurrent streams through the continuous-batching engine (e.g. 1,4,16,64) at "
        "--context tokens, fp32 and int4, against the KV-cache export at the same batch; plus a --context-token "
        "prompt arriving among --interference-streams decoding streams",
    )
    p.add_argument("--context", type=int, default=4096, help="with --streams: tokens of context per stream (default 4096)")
    p.add_argument("--interference-streams", type=int, default=4, help="with --streams: streams decoding while the long prompt arrives")
    p.add_argument(
        "--rounds", type=int, default=1, help="measure the systems in turn this many times and report medians "
        "over rounds (steadier ratios on a machine whose speed drifts)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``dijiang-deploy bench``: run, then print the table."""
    from .runner import DEFAULT_CONTEXTS, QUICK_CONTEXTS, BenchOptions, run_bench

    if args.streams is not None:
        return _run_streams(args)

    contexts = parse_contexts(args.contexts) if args.contexts else list(QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)
    for name, value in (
        ("--repeats", args.repeats), ("--decode-steps", args.decode_steps), ("--threads", args.threads), ("--rounds", args.rounds)
    ):
        if value is not None and value < (0 if name == "--threads" else 1):
            raise DiJiangError(f"{name} must be positive, got {value}")
    opts = BenchOptions(
        out=Path(args.out),
        contexts=contexts,
        systems=parse_systems(args.systems or (QUICK_SYSTEMS if args.quick else "all")),
        repeats=args.repeats or (3 if args.quick else 5),
        decode_steps=args.decode_steps or (8 if args.quick else 16),
        warmup_steps=args.warmup_steps,
        prefill_repeats=args.prefill_repeats,
        threads=args.threads,
        quick=args.quick,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        device=args.device,
        backend=args.backend,
        profile=not args.no_profile,
        timeout=args.timeout,
        seed=args.seed,
        rounds=args.rounds,
    )
    run_bench(opts)
    print((opts.out / "table.txt").read_text(), end="")
    print(f"\nwrote {opts.out}/table.md, table.txt, results.json, results.csv, plot.png")
    return 0


def _run_streams(args: argparse.Namespace) -> int:
    from .streams import STREAM_SYSTEMS, StreamsOptions, run_streams

    streams = parse_contexts(args.streams)
    if args.context < 2 or args.interference_streams < 1:
        raise DiJiangError("--context must be >= 2 and --interference-streams >= 1")
    if args.rounds < 1:
        raise DiJiangError(f"--rounds must be positive, got {args.rounds}")
    systems = parse_systems(args.systems) if args.systems else list(STREAM_SYSTEMS)
    unknown = [s for s in systems if s not in STREAM_SYSTEMS]
    if unknown:
        raise DiJiangError(f"--streams measures {', '.join(STREAM_SYSTEMS)}; not {', '.join(unknown)}")
    opts = StreamsOptions(
        out=Path(args.out), streams=streams, context=args.context, systems=systems,
        decode_steps=args.decode_steps or (4 if args.quick else 16), warmup_steps=args.warmup_steps,
        interference_streams=args.interference_streams, threads=args.threads, quick=args.quick,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, timeout=args.timeout, seed=args.seed,
        rounds=args.rounds,
    )
    run_streams(opts)
    print((opts.out / "table.txt").read_text(), end="")
    print(f"\nwrote {opts.out}/table.md, table.txt, results.json")
    return 0
