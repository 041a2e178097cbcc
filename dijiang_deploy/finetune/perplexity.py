"""Windowed perplexity (and top-1 agreement with a teacher) over a text.

Works on a DiJiang model in memory, a PyTorch checkpoint folder, or an
exported ONNX folder (recognised by its ``manifest.json``; scored with
``dijiang_deploy.runtime.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import load_model
from ..contract.errors import CheckpointError, DiJiangError
from ..modeling.model import DiJiangForCausalLM
from ..data import heldout_text
from ..data.text import DataError, load_tokenizer, read_text_source
from .teacher import SoftmaxTeacher, load_teacher


@dataclass
class EvalResult:
    """Attributes:
    perplexity: ``exp`` of the mean next-token NLL over all scored tokens.
    nll: that mean NLL (nats per token).
    tokens: number of scored (predicted) tokens.
    windows: number of windows.
    top1_agreement: fraction of positions where the model's argmax equals
        the teacher's (None without a teacher).
    teacher_perplexity: the teacher's perplexity on the same windows.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    top1_agreement: float | None = None
    teacher_perplexity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(ids: list[int], window: int) -> list[torch.Tensor]:
    """Non-overlapping ``[1, <=window]`` int64 windows (a last short one kept if >= 2 tokens)."""
    out = [torch.tensor(ids[i : i + window], dtype=torch.long)[None] for i in range(0, len(ids), window)]
    return [w for w in out if w.shape[1] >= 2]


def _nll_and_argmax(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    logq = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    nll = -logq.gather(-1, ids[0, 1:, None])[:, 0]
    return float(nll.sum()), nll.numel(), logits[0, :-1].argmax(-1)


def _scorer(model_or_dir: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], Path | None, int]:
    """``(score(ids [1, N]) -> logits [1, N, V], folder, vocab)``."""
    if isinstance(model_or_dir, DiJiangForCausalLM):
        model = model_or_dir

        def score(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(ids, mode="chunked").logits

        return score, None, model.config.vocab_size
    folder = Path(model_or_dir)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or directory")
    if not folder.is_dir() or not ((folder / "manifest.json").exists() or (folder / "config.json").exists()):
        raise CheckpointError(
            f"{folder}: expected a DiJiang checkpoint folder (config.json) or an exported ONNX folder "
            "(manifest.json), found neither"
        )
    if (folder / "manifest.json").exists():
        try:
            from ..runtime import Generator
        except ImportError as exc:
            raise DiJiangError(f"{folder}: scoring an ONNX export needs dijiang_deploy.runtime ({exc})") from exc
        gen = Generator.from_pretrained(folder)

        def score_onnx(ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(gen.score(ids.numpy()), dtype=np.float32))

        vocab = int(getattr(getattr(gen, "config", None), "vocab_size", 0) or 0)
        return score_onnx, folder, vocab
    model = load_model(folder)
    s, _, v = _scorer(model)
    return s, folder, v


def evaluate(
    model_or_dir: DiJiangForCausalLM | str | Path,
    data: str | Path | None = None,
    teacher: SoftmaxTeacher | str | Path | None = None,
    window: int = 512,
    max_tokens: int | None = None,
    tokenizer: Any = None,
) -> EvalResult:
    """Perplexity of a DiJiang model over a text, in non-overlapping windows.

    Args:
        model_or_dir: a model, a checkpoint folder, or an ONNX export folder
            (``manifest.json`` present; needs ``dijiang_deploy.runtime``).
        data: a text file / folder; None: the shipped held-out text.
        teacher: a :class:`SoftmaxTeacher`, or a source for
            :func:`load_teacher` (HF folder, .gguf, ``smollm2``), to also
            report top-1 agreement and the teacher's own perplexity.
        window: tokens per window (each window starts from an empty state).
        max_tokens: score only the first ``max_tokens`` tokens.
        tokenizer: object with ``encode(str) -> list[int]``, or a folder
            holding ``tokenizer.json``; default the model folder's.

    Raises:
        DataError: missing or empty text. CheckpointError: bad folder.
    """
    if window < 2:
        raise DiJiangError(f"window must be at least 2 tokens, got {window}")
    text = "\n\n".join(read_text_source(data)) if data is not None else heldout_text()
    score, folder, vocab = _scorer(model_or_dir)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tok_dir = Path(tokenizer) if tokenizer is not None else folder
        if tok_dir is None:
            raise DiJiangError("evaluate() on an in-memory model needs a tokenizer")
        if not (tok_dir / "tokenizer.json").exists() and (tok_dir / "manifest.json").exists():
            raise DataError(f"{tok_dir}: no tokenizer.json in this ONNX folder; pass the checkpoint folder as tokenizer")
        tokenizer = load_tokenizer(tok_dir, vocab)
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"{data or 'held-out text'}: fewer than 2 tokens to score")
    if isinstance(teacher, (str, Path)):
        teacher = load_teacher(teacher)
    total, count, agree, t_total = 0.0, 0, 0, 0.0
    wins = windows(ids, window)
    for w in wins:
        logits = score(w)
        nll, n, arg = _nll_and_argmax(logits, w)
        total += nll
        count += n
        if teacher is not None:
            t_logits, _ = teacher(w)
            t_nll, _, t_arg = _nll_and_argmax(t_logits, w)
            t_total += t_nll
            agree += int((t_arg == arg).sum())
    return EvalResult(
        perplexity=math.exp(total / count),
        nll=total / count,
        tokens=count,
        windows=len(wins),
        top1_agreement=agree / count if teacher is not None else None,
        teacher_perplexity=math.exp(t_total / count) if teacher is not None else None,
    )


#: Questions for :func:`greedy_answers` (not among the training prompts).
CHAT_QUESTIONS = (
    "What is the capital of Japan?",
    "Give me two tips for staying focused while studying.",
    "Explain what a rainbow is in one or two sentences.",
)


@torch.no_grad()
def greedy_answers(
    model_dir: str | Path, questions: tuple[str, ...] = CHAT_QUESTIONS, max_new_tokens: int = 60
) -> list[str]:
    """Greedy chat answers of a PyTorch checkpoint (chat template from its folder).

    Prefill runs in chunked mode, decoding in recurrent mode from the state.
    """
    from transformers import AutoTokenizer

    model = load_model(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eos = model.config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    answers = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
        out = model(torch.tensor([list(ids)]), mode="chunked")
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            out = model(torch.tensor([[nxt]]), mode="recurrent", state=out.state)
        answers.append(tok.decode(new))
    return answers
