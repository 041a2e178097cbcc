"""``finetune`` and ``eval`` subcommands; the main CLI calls :func:`add_parsers`."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..cli_types import float_in, int_at_least, positive_float, positive_int


#: config.STAGE2_TRAIN, spelled out so that building the parser needs no torch.
STAGE2_TRAIN = ("all", "attention", "adapters", "dijiang")


def _finetune(args: argparse.Namespace) -> int:
    from .api import finetune
    from .config import FinetuneConfig
    from ..quantization.grid import QuantAwareConfig

    cfg = FinetuneConfig(threads=args.threads, device=args.device, teacher_pass=args.teacher_pass)
    if args.quant_aware:
        cfg.quant_aware = QuantAwareConfig.parse(
            args.quant_aware, args.quant_block_size, args.quant_symmetric, calibrate=not args.no_quant_calibrate,
            start=args.quant_start,
        )
    if args.generated is not None:
        cfg.data.generated = args.generated
    cfg.data = dataclasses.replace(cfg.data, max_scale=args.max_data_scale)
    cfg.stage2 = dataclasses.replace(cfg.stage2, train=args.stage2_train, hidden_weight=args.hidden_weight)
    if args.stage1_fraction is not None:
        cfg.stage1 = dataclasses.replace(cfg.stage1, fraction=args.stage1_fraction)
    cfg.stage1 = dataclasses.replace(cfg.stage1, refit_output=args.refit)
    result = finetune(
        args.model_dir,
        args.output,
        data=args.data,
        teacher=args.teacher,
        steps=args.steps,
        budget_minutes=args.budget_minutes,
        seed=args.seed,
        lora_rank=args.lora_rank,
        stage2=args.stage2,
        resume=not args.no_resume,
        progress=not args.quiet,
        overwrite=args.overwrite,
        config=cfg,
    )
    ppl = f", held-out perplexity {result.heldout_perplexity:.2f}" if result.heldout_perplexity else ""
    print(
        f"wrote {result.out_dir}: stage 1 {result.stage1_steps} steps, stage 2 {result.stage2_steps} steps, "
        f"{result.train_tokens} training tokens, {result.seconds / 60:.1f} min{ppl}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .perplexity import evaluate

    import torch

    from .config import default_threads

    torch.set_num_threads(args.threads or default_threads())
    result = evaluate(
        args.model_dir, args.data, teacher=args.teacher, window=args.window, max_tokens=args.max_tokens,
        tokenizer=args.tokenizer,
    )
    answers = []
    if args.chat:
        from .perplexity import CHAT_QUESTIONS, greedy_answers

        answers = list(zip(CHAT_QUESTIONS, greedy_answers(args.model_dir, max_new_tokens=args.chat_tokens)))
    if args.json:
        print(json.dumps({**result.to_dict(), "chat": answers}))
        return 0
    for q, a in answers:
        print(f"Q: {q}\nA: {a}\n")
    line = f"perplexity {result.perplexity:.3f} over {result.tokens} tokens ({result.windows} windows of {args.window})"
    if result.top1_agreement is not None:
        line += f"; top-1 agreement with the teacher {result.top1_agreement:.3f}, teacher perplexity {result.teacher_perplexity:.3f}"
    print(line)
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``finetune`` and ``eval`` on the main CLI's subparsers.

    Handlers raise :class:`~dijiang_deploy.contract.errors.DiJiangError` subclasses for
    bad input, which the main CLI prints as one line (exit status 2).
    """
    # One function on purpose: the flags read as one declarative table, in the order `--help` lists them.
    p = subparsers.add_parser(
        "finetune", help="train a converted checkpoint to match its softmax teacher",
        description="Distil the softmax teacher into the DiJiang student: stage 1 fits each layer's attention "
        "to the teacher's on the teacher's own hidden states, stage 2 trains end to end on the teacher's "
        "next-token distribution. Adapters are merged; the output is a plain checkpoint. The default budget "
        "is about 9 minutes of wall-clock time; an interrupted run resumes.",
    )
    p.add_argument("model_dir", help="DiJiang checkpoint folder (from convert)")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--data", help="training text: a file or a folder of .txt/.md/.rst/.jsonl (default: built-in local text)")
    p.add_argument("--teacher", help="softmax teacher: HF folder, .gguf or smollm2 (default: the checkpoint's source)")
    p.add_argument("--steps", type=positive_int, help="total optimizer steps instead of a time budget")
    p.add_argument("--budget-minutes", type=positive_float, help="wall-clock budget (default 9)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and initialisation (default 0)")
    p.add_argument("--lora-rank", type=int_at_least(0), default=0, help="low-rank adapters on q/k/v/o (default 0: none; the demo uses 16)")
    p.add_argument("--stage2", action=argparse.BooleanOptionalAction, default=True, help="end-to-end distillation stage")
    p.add_argument(
        "--stage2-train", choices=STAGE2_TRAIN, default="all",
        help="what stage 2 trains: all (attention, MLPs and norms), attention (MLPs frozen: with --lora-rank the "
        "result ships as a small delta, see `convert --model smollm2`), adapters (needs --lora-rank: the MLPs through "
        "adapters too, and the norms; still a small delta), dijiang (only the new parameters)",
    )
    p.add_argument(
        "--stage1-fraction", type=float_in(0.0, 1.0, low_open=True, high_open=True),
        help="share of the budget (or of --steps) for stage 1 (default 0.5; less when continuing from a trained "
        "conversion, whose attention transfer is already done)",
    )
    p.add_argument(
        "--refit", action=argparse.BooleanOptionalAction, default=True,
        help="least-squares refit of the output projections around stage 1 (--no-refit when continuing from a "
        "trained conversion: the refit would replace what its stage 2 taught them)",
    )
    p.add_argument(
        "--hidden-weight", type=float_in(0.0, 100.0), default=0.0,
        help="weight of stage 2's per-layer hidden-state distillation term (default 0: off)",
    )
    p.add_argument(
        "--max-data-scale", type=float_in(1.0, 1000.0),
        help="cap of the training data's growth with the budget (default 4; the teacher cache takes ~69 KB/token)",
    )
    p.add_argument(
        "--generated", type=int_at_least(0),
        help="chat answers the teacher writes from built-in prompts, added to the built-in text "
        "(default: 32 for budgets >= 6 min, else 0; budgets over 9 min scale it and the training text "
        "with the budget, up to 4x)",
    )
    p.add_argument(
        "--quant-aware", choices=("int4", "int8"),
        help="train stage 2 through this weight grid and save weights on it, so that "
        "`export --weights int4` (or int8) loses nothing against the float checkpoint",
    )
    p.add_argument("--quant-block-size", type=positive_int, default=32, help="block size of --quant-aware (match export --block-size)")
    p.add_argument(
        "--quant-symmetric", action="store_true",
        help="symmetric --quant-aware grid (for TensorRT Q/DQ exports; default asymmetric, the ONNX Runtime form)",
    )
    p.add_argument(
        "--quant-start", type=float_in(0.0, 1.0, high_open=True), default=0.5,
        help="share of stage 2 trained in float before the --quant-aware grid phase (0: from the first step)",
    )
    p.add_argument(
        "--no-quant-calibrate", action="store_true",
        help="--quant-aware without the activation-aware channel scaling before stage 2",
    )
    p.add_argument("--threads", type=positive_int, help="torch threads (default: the CPUs other processes leave idle)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--teacher-pass", choices=("auto", "cache", "online"), default="auto",
                   help="cache: run the teacher once and keep its states in host memory (CPU default); "
                        "online: run it on every batch, no cap on the data (GPU default)")
    p.add_argument("--no-resume", action="store_true", help="ignore state left by an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_finetune)

    p = subparsers.add_parser(
        "eval", help="windowed perplexity of a checkpoint or ONNX export over a text",
        description="Perplexity over a text in windows that each start from an empty state (default: the "
        "held-out text shipped with the package); with --teacher also top-1 agreement with the softmax model.",
    )
    p.add_argument("model_dir", help="DiJiang checkpoint folder or exported ONNX folder")
    p.add_argument("--data", help="text file or folder (default: the shipped held-out text)")
    p.add_argument("--teacher", help="also report top-1 agreement with this softmax model (HF folder, .gguf, smollm2)")
    p.add_argument("--window", type=int_at_least(2), default=512, help="tokens per window (default 512)")
    p.add_argument("--max-tokens", type=int_at_least(2), help="score only the first N tokens")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: MODEL_DIR's)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: the CPUs other processes leave idle)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--chat", action="store_true", help="also print greedy answers to a few chat questions")
    p.add_argument("--chat-tokens", type=positive_int, default=60, help="max new tokens per chat answer (default 60)")
    p.set_defaults(func=_eval)


__all__ = ["add_parsers"]

