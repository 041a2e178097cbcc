"""``dijiang-deploy`` command line: one subcommand per stage of the pipeline.

checkpoint --convert--> DiJiang checkpoint --export--> ONNX folder
--build--> TensorRT engine; ``run``, ``verify``, ``bench`` use the results.
Each handler imports its module lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from .errors import DiJiangError


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert

    source = args.model or args.source
    if not source:
        raise DiJiangError("convert needs a SOURCE folder/.gguf file or --model NAME")
    opts = ConvertOptions(qmc=args.qmc, seed=args.seed, table_length=args.table_length)
    model = convert(source, args.output, opts, overwrite=args.overwrite, progress=not args.quiet)
    cfg = model.config
    print(
        f"wrote {args.output}: {cfg.family}, {cfg.num_layers} layers x {cfg.num_heads} heads x d={cfg.head_dim}, "
        f"state {cfg.num_layers * cfg.num_heads * cfg.head_dim**2 * 4 / 2**20:.2f} MiB per sequence (fp32)"
    )
    return 0


def _not_yet(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def handler(_args: argparse.Namespace) -> int:
        raise DiJiangError(f"'{name}' is not available yet in this version ({issue})")

    return handler


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"dijiang_deploy.{module}"), func)(args)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dijiang-deploy",
        description="DiJiang linear-attention models: convert, export to ONNX, build TensorRT engines, run.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="turn a pretrained HF/GGUF model into a DiJiang checkpoint")
    p.add_argument("source", nargs="?", help="Hugging Face model folder or .gguf file")
    p.add_argument("--model", help="embedded model name instead of SOURCE (smollm2)")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--qmc", default="sobol", choices=["sobol", "halton", "random"], help="points for the DCT weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-length", type=int, help="decay table length (default: model max positions)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="export a DiJiang checkpoint to an ONNX step graph")
    p.set_defaults(func=_not_yet("export", "ONNX export lands with issue #3"))

    p = sub.add_parser("build", help="build a TensorRT engine from an exported ONNX folder")
    p.set_defaults(func=_not_yet("build", "the TensorRT builder lands with issue #4"))

    p = sub.add_parser("run", help="generate text from an exported model")
    p.set_defaults(func=_not_yet("run", "the runtime lands with issue #3"))

    p = sub.add_parser("verify", help="compare an export against the PyTorch reference")
    p.set_defaults(func=_not_yet("verify", "verification lands with issue #3"))

    p = sub.add_parser("bench", help="benchmark decode/prefill speed and memory against baselines")
    p.set_defaults(func=_not_yet("bench", "benchmarks land with issue #5"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except DiJiangError as exc:
        if args.verbose:
            raise
        print(f"dijiang-deploy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
