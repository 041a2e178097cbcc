"""``dijiang-deploy`` command line: one subcommand per stage of the pipeline.

checkpoint --convert--> DiJiang checkpoint --export--> ONNX folder
--build--> TensorRT engine; ``run``, ``verify``, ``bench`` use the results.
Each handler imports its module lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .cli_types import float_in, int_at_least, positive_float, positive_int
from .contract.errors import DiJiangError


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert, embedded_model_path

    if args.model and args.source:
        raise DiJiangError("give either SOURCE or --model NAME, not both")
    if args.model:
        embedded_model_path(args.model)  # an unknown name lists the embedded ones instead of failing as a path
    if args.model or str(args.source or "").endswith(".gguf"):
        from .contract.extras import require

        require("gguf", "converting a GGUF file")
    source = args.model or args.source
    if not source:
        raise DiJiangError("convert needs a SOURCE folder/.gguf file or --model NAME")
    custom = [f for f, v in (("--qmc", args.qmc), ("--seed", args.seed), ("--table-length", args.table_length)) if v is not None]
    if args.model and not args.untrained:
        if custom:
            raise DiJiangError(f"{', '.join(custom)} shape an untrained conversion: add --untrained "
                               f"(the shipped {args.model} conversion was trained with the defaults)")
        from .convert import convert_shipped

        model = convert_shipped(args.model, args.output, overwrite=args.overwrite, progress=not args.quiet)
        record = model.config.raw["dijiang_shipped"]
        ppl = record.get("heldout_perplexity")
        print(f"trained conversion: {record.get('recipe', '?')}"
              + (f", held-out perplexity {ppl:.1f}" if ppl else ""))
    else:
        if args.untrained and not args.model:
            raise DiJiangError("--untrained applies to --model NAME (a SOURCE is always converted untrained)")
        opts = ConvertOptions(qmc=args.qmc or "sobol", seed=args.seed or 0, table_length=args.table_length)
        model = convert(source, args.output, opts, overwrite=args.overwrite, progress=not args.quiet)
    cfg = model.config
    print(
        f"wrote {args.output}: {cfg.family}, {cfg.num_layers} layers x {cfg.num_heads} heads x d={cfg.head_dim}, "
        f"state {cfg.num_layers * cfg.num_heads * cfg.head_dim**2 * 4 / 2**20:.2f} MiB per sequence (fp32)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import ExportOptions, export_checkpoint

    if (args.float_head or args.quantize_head) and args.weights not in ("int8", "int4"):
        flag = "--float-head" if args.float_head else "--quantize-head"
        raise DiJiangError(f"{flag} applies to --weights int8/int4 exports only (other exports keep the head as it is)")
    quantized = args.weights in ("int8", "int4")
    if not quantized and (args.no_calibrate or args.calibration_data or args.calibration_tokens is not None):
        raise DiJiangError("calibration options apply to --weights int8/int4 exports only")
    if not quantized and args.accuracy_level is not None:
        raise DiJiangError("--accuracy-level applies to --weights int8/int4 exports only")
    opts = ExportOptions(
        dtype=args.dtype,
        logits=args.logits,
        attention_op=args.attention_op,
        max_chunk=args.max_chunk,
        weights=args.weights,
        block_size=args.block_size,
        symmetric=False if args.asymmetric else True if args.symmetric else None,
        quantize_head=False if args.float_head else True if args.quantize_head else None,
        calibrate=not args.no_calibrate,
        calibration_data=args.calibration_data,
        calibration_tokens=ExportOptions.calibration_tokens if args.calibration_tokens is None else args.calibration_tokens,
        accuracy_level=args.accuracy_level,
    )
    man = export_checkpoint(args.model_dir, args.output, opts, overwrite=args.overwrite)
    ops = sum(man.decode_ops_per_layer.values())
    print(
        f"wrote {args.output}: flavor {man.flavor} (opset {man.opset}), {man.dtype}, weights {man.weights}, logits {man.logits}, "
        f"{man.num_layers} layers, {ops:.0f} nodes per layer, decay {man.decay}, {man.export_seconds:.0f}s"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from .runtime import Model, SamplingParams, Session

    model = Model.open(args.onnx_dir, backend=args.backend, providers=args.provider, threads=args.threads,
                       allow_engine_host_code=args.allow_engine_host_code)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise DiJiangError("give --prompt TEXT (or pipe the prompt on standard input)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise DiJiangError("empty prompt: give some text with --prompt")
    session = Session.load(model, args.load_state) if args.load_state else model.session()
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop or (), stream=True)
    if args.chat:
        stream = session.chat(prompt, **options)
    else:
        session.append(prompt)
        stream = session.generate(**options)
    for ev in stream:
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    print(file=sys.stderr)
    out = stream.output
    out.stats.prompt_tokens, out.stats.prefill_seconds = session.last_prefill
    print(_run_summary(out, model.manifest.state_bytes(), session.position), file=sys.stderr)
    if args.save_state:
        session.save(args.save_state)
        print(f"[saved the conversation ({session.position} tokens) to {args.save_state}]", file=sys.stderr)
    return 0


#: Why generation ended, as ``run`` tells it.
_FINISH = {
    "eos": "the model ended its answer (end-of-sequence token)",
    "length": "reached --max-new-tokens",
    "stop": "a --stop string appeared",
    "position_limit": "reached the decay tables' last position",
}


def _run_summary(result, state_bytes: int, history: int | None = None) -> str:
    """The ``[...]`` line ``run`` prints after the text: speed, state size, why it stopped.

    ``result`` is a :class:`~dijiang_deploy.runtime.GenerationOutput` or a
    one-row :class:`~dijiang_deploy.runtime.GenerationResult`.
    """
    st = result.stats
    reason = getattr(result, "finish_reason", None) or result.finish_reasons[0]
    prefill = st.prompt_tokens / st.prefill_seconds if st.prefill_seconds else 0.0
    # One or two steps time mostly first-call setup, not the steady decode speed.
    decode = f"decode {st.decode_tokens_per_s:.1f} tok/s" if st.decode_steps >= 4 else "too few steps to time decode"
    held = f" for {history} tokens of history" if history is not None else ""
    return (
        f"[prompt {st.prompt_tokens} tokens, prefill {prefill:.1f} tok/s; generated {st.new_tokens} tokens, {decode}; "
        f"state {state_bytes / 2**20:.2f} MiB{held}; stopped: {_FINISH.get(reason, reason)}]"
    )


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    text = None
    if args.text:
        from pathlib import Path

        path = Path(args.text)
        if not path.is_file():
            raise DiJiangError(f"{path}: no such text file")
        text = path.read_text(errors="replace")
    report = verify(args.onnx_dir, args.reference, tokens=args.tokens, tolerance=args.tolerance, text=text)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _version() -> str:
    from ._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    # One function on purpose: the subcommands' flags read as one declarative table, in the order `--help` lists them.
    parser = argparse.ArgumentParser(
        prog="dijiang-deploy",
        description="DiJiang linear-attention models: convert, export to ONNX, build TensorRT engines, run.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", help="turn a pretrained HF/GGUF model into a DiJiang checkpoint",
        description="Replace every softmax attention of a GPT-NeoX/Pythia or LLaMA-family model with DiJiang "
        "attention (DCT feature map, per-head decay) and write a checkpoint folder that reloads on its own. "
        "A SOURCE (and --model NAME --untrained) writes nonsense until it is fine-tuned (dijiang-deploy finetune); "
        "--model smollm2 gives the project's trained conversion, shipped as a small delta over the package's weights.",
    )
    p.add_argument("source", nargs="?", help="Hugging Face model folder or .gguf file")
    p.add_argument("--model", help="embedded model name instead of SOURCE (smollm2)")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--untrained", action="store_true",
                   help="with --model: the raw conversion instead of the shipped trained one")
    p.add_argument("--qmc", choices=["sobol", "halton", "random"], help="points for the DCT weights (default sobol)")
    p.add_argument("--seed", type=int, help="seed of the DCT points (default 0)")
    p.add_argument("--table-length", type=int, help="decay table length (default: model max positions)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "export", help="export a DiJiang checkpoint to an ONNX step graph",
        description="Write an ONNX folder (model.onnx, manifest.json, tokenizer) whose graph takes a chunk of "
        "tokens and the per-layer recurrent states and returns logits and the new states: one graph for "
        "prefill and decode. `verify` checks it against PyTorch; `run` generates with it.",
    )
    p.add_argument("model_dir", help="DiJiang checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="export folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weights/activations (state stays fp32)")
    p.add_argument("--logits", default="last", choices=["last", "all"], help="last position only, or all (scoring)")
    p.add_argument(
        "--attention-op",
        default="auto",
        help="linear-attention | function | plugin (traced graph, one recurrence node per layer; see "
        "plugins/README.md) or inline (graph built directly, recurrence as standard ops: fastest on ONNX Runtime "
        "CPU; fp32, geometric decay). Default auto: inline where it applies, else linear-attention",
    )
    p.add_argument("--max-chunk", type=int, default=64, help="prefill chunk length the runtime feeds")
    p.add_argument(
        "--weights", choices=["fp32", "fp16", "int8", "int4"], help="weight format (default: --dtype); int8/int4 "
        "are weight-only block quantization of the linear layers"
    )
    p.add_argument("--block-size", type=int, default=32, help="quantization block length")
    zp = p.add_mutually_exclusive_group()
    zp.add_argument(
        "--asymmetric", action="store_true", help="blocks with zero points (default for int4 inline exports: "
        "ONNX Runtime only, same speed, lower error)"
    )
    zp.add_argument(
        "--symmetric", action="store_true",
        help="blocks without zero points (default otherwise, unless the checkpoint records a quant-aware grid; TensorRT needs it)",
    )
    head = p.add_mutually_exclusive_group()
    head.add_argument(
        "--float-head", action="store_true", help="keep the LM head in floating point (the default for --weights int8)"
    )
    head.add_argument(
        "--quantize-head", action="store_true",
        help="quantize the LM head to 8 bits (the default for --weights int4: faster, ~2 points less top-1 agreement)",
    )
    p.add_argument(
        "--no-calibrate", action="store_true", help="int8/int4: plain round-to-nearest, without the activation-aware "
        "rescaling of input channels (default: rescale, measured on --calibration-data)"
    )
    p.add_argument("--calibration-data", help="text file or folder for calibration (default: built-in local corpus)")
    p.add_argument("--calibration-tokens", type=int, help="calibration tokens (default 1024)")
    p.add_argument(
        "--accuracy-level", type=int, choices=range(5), metavar="{0..4}",
        help="int8/int4: ONNX Runtime MatMulNBits compute precision (default 4: int8 activations, fastest; "
        "0: float32 activations, more accurate, slower)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_export)


    p = sub.add_parser(
        "run", help="generate text from an exported model",
        description="Stream generated text to standard output with fixed memory (the recurrent state does not "
        "grow with the text); timings and the reason generation stopped go to standard error.",
    )
    p.add_argument("onnx_dir", help="export folder")
    p.add_argument("--prompt", help="prompt text (default: standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="sample from the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0,
                   help="sample from the smallest set of tokens with this much probability (default 1: all)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="penalise tokens already seen, CTRL rule (default 1: off)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, help="sampling seed (default: fresh randomness)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument("--backend", default="ort", choices=["ort", "trt"], help="ort: ONNX_DIR is an export; trt: an engine folder")
    p.add_argument("--provider", action="append", help="ONNX Runtime provider, e.g. CUDAExecutionProvider (repeatable)")
    p.add_argument("--allow-engine-host-code", action="store_true", help="--backend trt: let an engine built with "
                   "--serialize-plugins run the plugin code it carries (only for engines you trust)")
    p.add_argument("--load-state", metavar="FILE", help="continue the conversation saved in this state file")
    p.add_argument("--save-state", metavar="FILE", help="save the conversation (state, history) here afterwards")
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "verify", help="compare an export against the PyTorch reference",
        description="Score the same tokens with the export and with the PyTorch checkpoint it came from; report "
        "the largest logit difference, greedy agreement and, for int8/int4 exports, top-1 agreement and "
        "perplexity change. Exit status 1 when outside the tolerance.",
    )
    p.add_argument("onnx_dir", help="export folder")
    p.add_argument("--reference", required=True, help="the DiJiang checkpoint folder it came from")
    p.add_argument("--tokens", type=int_at_least(2), default=200, help="random tokens to score (default 200)")
    p.add_argument(
        "--tolerance", type=positive_float,
        help="max abs logit difference against PyTorch float32 (default 1e-4 fp32, 0.5 fp16); an fp32 export past "
        "it is judged against a float64 evaluation instead: at most twice PyTorch's own float32 error, capped at "
        "1e-3 of the largest logit (docs/numerics.md); the report lists the checks it ran",
    )
    p.add_argument("--text", help="score this text file instead of random tokens (perplexity for int8/int4)")
    p.set_defaults(func=_verify)

    # Each feature's subcommands live with it (build, bench, finetune + eval, serve).
    from .bench.cli import add_parsers as bench_parsers
    from .build.cli import add_parsers as build_parsers
    from .finetune.cli import add_parsers as finetune_parsers
    from .serving.cli import add_parsers as serve_parsers

    for add in (build_parsers, bench_parsers, finetune_parsers, serve_parsers):
        add(sub)
    return parser


#: Optional parts of the install each subcommand needs (``run`` needs only the core).
COMMAND_EXTRAS = {
    "convert": ("export",), "export": ("export",), "verify": ("export",), "finetune": ("export",),
    "eval": ("export",), "bench": ("export", "bench"), "build": ("export",), "serve": ("serve",),
}


def main(argv: Sequence[str] | None = None) -> int:
    from .contract.extras import require

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        for extra in COMMAND_EXTRAS.get(args.command, ()):
            require(extra, f"dijiang-deploy {args.command}")
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
