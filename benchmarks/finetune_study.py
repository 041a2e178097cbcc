"""Fine-tuning studies behind docs/finetune-results.md ("Stage split and stage-2 learning rate").

Four commands, each printing one line per result:

    # a recipe variant: FinetuneConfig fields the CLI does not expose
    python benchmarks/finetune_study.py recipe CONVERTED OUT --minutes 9 --set stage1.fraction=0.7 --set stage2.lr=6e-4
    # held-out perplexity of a checkpoint and its teacher by position inside each window
    python benchmarks/finetune_study.py positions CHECKPOINT
    # the teacher with one DiJiang layer of CHECKPOINT swapped in, for every layer, then all
    python benchmarks/finetune_study.py layers CHECKPOINT
    # the GroupNorm error floor: o_proj refitted through each normaliser layout
    python benchmarks/finetune_study.py groupnorm CHECKPOINT --fit-tokens 8192

The held-out text is the one shipped in the package (windows of 512, each from
an empty state, as ``dijiang-deploy eval`` scores it); the teacher is the
checkpoint's recorded source (``--teacher`` to override).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

import torch

from dijiang_deploy.checkpoint import load_model
from dijiang_deploy.cli_types import int_at_least
from dijiang_deploy.finetune import FinetuneConfig, finetune
from dijiang_deploy.data import heldout_text
from dijiang_deploy.data.text import load_tokenizer
from dijiang_deploy.finetune.data import builtin_corpus, pack
from dijiang_deploy.finetune.floors import floor_table, output_floors
from dijiang_deploy.finetune.teacher import load_teacher, softmax_attention

WINDOW = 512
BUCKETS = ((0, 32), (32, 64), (64, 128), (128, 256), (256, 384), (384, WINDOW - 1))


def _set(cfg: FinetuneConfig, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    section, _, field = key.partition(".")
    target = getattr(cfg, section, None)
    if target is None or not field or not hasattr(target, field):
        raise SystemExit(f"--set {assignment!r}: expected SECTION.FIELD=VALUE, e.g. stage1.fraction=0.7")
    current = getattr(target, field)
    if isinstance(current, bool):  # bool("false") is True
        if value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--set {assignment!r}: {field} takes true or false")
        setattr(target, field, value.lower() in ("true", "1"))
    elif current is None:
        raise SystemExit(f"--set {assignment!r}: {field} has no default to take its type from")
    else:
        setattr(target, field, type(current)(value))


def _windows(checkpoint: str) -> tuple[list[torch.Tensor], object]:
    model = load_model(checkpoint).eval()
    ids = load_tokenizer(checkpoint, model.config.vocab_size).encode(heldout_text())
    return [torch.tensor(ids[i : i + WINDOW])[None] for i in range(0, len(ids) - WINDOW + 1, WINDOW)], model


def _nll(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return -logq.gather(-1, w[0, 1:, None])[:, 0]


@torch.no_grad()
def _by_position(windows: list[torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor]) -> str:
    sums = {b: 0.0 for b in BUCKETS}
    total, count = 0.0, 0
    for w in windows:
        nll = _nll(score(w), w)
        total, count = total + float(nll.sum()), count + nll.numel()
        for lo, hi in BUCKETS:
            sums[lo, hi] += float(nll[lo:hi].sum())
    parts = [f"{lo}-{hi}: {math.exp(sums[lo, hi] / (len(windows) * (hi - lo))):.1f}" for lo, hi in BUCKETS]
    return f"perplexity {math.exp(total / count):.1f}; by position " + ", ".join(parts)


@torch.no_grad()
def _hybrid(teacher, student, windows: list[torch.Tensor], swap: set[int]) -> float:
    """Perplexity of the teacher with the DiJiang attention of the layers in ``swap``."""
    tm = teacher.model
    total, count = 0.0, 0
    for w in windows:
        pos = torch.arange(w.shape[1])[None]
        cos, sin = tm.rotary(pos)
        h = tm.body.embed(w)
        for i, layer in enumerate(tm.body.layers):
            xn = layer.input_layernorm(h)
            if i in swap:
                state = torch.zeros(1, *student.config.state_shape)
                a, _ = student.body.layers[i].attn(xn, cos, sin, pos, None, state, "chunked", 64)
            else:
                a = softmax_attention(layer.attn, xn, cos, sin, None)
            if layer.parallel_residual:
                h = h + a + layer.mlp(layer.post_attention_layernorm(h))
            else:
                h = h + a
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        nll = _nll(tm.head(tm.body.final_norm(h)), w)
        total, count = total + float(nll.sum()), count + nll.numel()
    return math.exp(total / count)


def _groupnorm(teacher, student, checkpoint: str, windows: list[torch.Tensor], fit_tokens: int) -> None:
    """Fit on packed built-in text (sequences of 256 from position 0), score on the held-out windows."""
    tok = load_tokenizer(checkpoint, student.config.vocab_size)
    docs = [tok.encode(t) for t in builtin_corpus(4 * fit_tokens)]
    fit = pack(docs, 256, fit_tokens, seed=0)
    print(f"fit on {fit.numel()} tokens of built-in text, scored on {sum(w.numel() for w in windows)} held-out tokens",
          flush=True)
    print(floor_table(output_floors(teacher, student, fit, torch.cat(windows))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recipe", help="fine-tune with FinetuneConfig fields set")
    r.add_argument("converted")
    r.add_argument("out")
    r.add_argument("--minutes", type=float, default=9.0)
    r.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    for name in ("positions", "layers", "groupnorm"):
        p = sub.add_parser(name)
        p.add_argument("checkpoint")
        p.add_argument("--teacher", help="default: the checkpoint's recorded source")
        if name == "groupnorm":
            p.add_argument("--fit-tokens", type=int_at_least(256), default=8192,
                           help="built-in training text the fits see (at least one 256-token sequence)")
    args = parser.parse_args()

    if args.command == "recipe":
        cfg = FinetuneConfig()
        for assignment in args.set:
            _set(cfg, assignment)
        res = finetune(args.converted, args.out, budget_minutes=args.minutes, config=cfg, overwrite=True,
                       resume=False, progress=False)
        print(f"{args.out}: {' '.join(args.set) or 'defaults'}: stage 1 {res.stage1_steps} / stage 2 "
              f"{res.stage2_steps} steps, held-out perplexity {res.heldout_perplexity:.1f}, {res.seconds:.0f} s")
        return
    windows, student = _windows(args.checkpoint)
    teacher = load_teacher(args.teacher, args.checkpoint)
    if args.command == "groupnorm":
        _groupnorm(teacher, student, args.checkpoint, windows, args.fit_tokens)
        return
    if args.command == "positions":
        print("student:", _by_position(windows, lambda w: student(w, mode="chunked").logits))
        print("teacher:", _by_position(windows, lambda w: teacher(w)[0]))
        return
    print(f"teacher alone: {_hybrid(teacher, student, windows, set()):.2f}", flush=True)
    n = len(student.body.layers)
    for i in range(n):
        print(f"layer {i} swapped: {_hybrid(teacher, student, windows, {i}):.2f}", flush=True)
    print(f"all {n} swapped: {_hybrid(teacher, student, windows, set(range(n))):.2f}")


if __name__ == "__main__":
    main()
