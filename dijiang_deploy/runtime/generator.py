"""Fixed-memory streaming generation over an exported step graph."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DiJiangError, ExportError, PositionLimitError
from ..export.manifest import Manifest
from .sampling import Sampler, SamplingOptions


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of one ``generate`` call.

    ``decode_steps`` counts the one-token graph runs: the first new token
    comes from the prefill's logits, and the step that produced an
    end-of-sequence token counts although that token is not returned.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class GenerationResult:
    """Generated ids per row (prompt excluded), their text, and timing."""

    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class StreamEvent:
    """One generated token of row ``row``; ``text`` is its newly decoded text."""

    row: int
    token_id: int
    text: str


class GenerationStream:
    """What ``generate(..., stream=True)`` returns: an iterator of :class:`StreamEvent`.

    ``result`` (the :class:`GenerationResult`: finish reasons, timings) is
    None until the iterator is exhausted.
    """

    def __init__(self, run: Iterator[StreamEvent | GenerationResult]):
        self._run = run
        self.result: GenerationResult | None = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> StreamEvent:
        for ev in self._run:
            if isinstance(ev, GenerationResult):
                self.result = ev
                break
            return ev
        raise StopIteration


class Generator:
    """Generation and scoring over a DiJiang export.

    Use :meth:`from_pretrained`. Memory is fixed: the recurrent state
    (``layers x [B, H, d, d]`` float32) and IO buffers are allocated once per
    batch size and reused for every token.
    """

    def __init__(self, backend, tokenizer=None):
        self.backend = backend
        self.manifest: Manifest = backend.manifest
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        threads: int | None = None,
        load_tokenizer: bool = True,
    ) -> "Generator":
        """Open an export folder.

        Args:
            backend: ``ort`` (ONNX Runtime; CPU by default, ``providers``
                selects e.g. ``CUDAExecutionProvider``) or ``trt``.
            threads: ONNX Runtime intra-op threads.
            load_tokenizer: load the tokenizer files saved beside the graph.
        """
        if backend == "ort":
            from .ort_backend import OrtBackend, default_threads

            impl = OrtBackend(folder, providers=providers, threads=threads or default_threads())
        elif backend == "trt":
            if providers:
                raise DiJiangError("providers apply to backend='ort' only")
            from .trt_backend import TrtBackend

            # ``folder`` is an engine folder (dijiang-deploy build): it carries
            # the manifest and the tokenizer files like an export folder.
            impl = TrtBackend(folder)
        else:
            raise DiJiangError(f"unknown backend {backend!r}; use 'ort' or 'trt'")
        tokenizer = _load_tokenizer(Path(folder)) if load_tokenizer else None
        return cls(impl, tokenizer)

    # -- helpers --------------------------------------------------------------

    def _check_positions(self, longest: int) -> None:
        limit = self.manifest.position_limit
        if limit is not None and longest > limit:
            raise PositionLimitError(
                f"input of {longest} tokens is past this model's limit of {limit} positions "
                "(its decay tables are not geometric, so they cannot be extended)"
            )

    def _prefill(self, rows: Sequence[Sequence[int]], collect_all: bool = False) -> np.ndarray:
        """Feed left-padded prompts chunk by chunk; returns the last logits ``[B, V]``
        (or, with ``collect_all``, all positions ``[B, N, V]`` aligned right)."""
        b = len(rows)
        lengths = [len(r) for r in rows]
        if min(lengths) == 0:
            raise DiJiangError("empty prompt: give at least one token")
        n = max(lengths)
        self._check_positions(n)
        chunk = self.manifest.max_chunk
        # Left-pad so every row's last token sits at the end; pad the front of
        # the sequence up to a whole number of chunks so only two buffer
        # shapes (chunk and 1) ever exist. Padding leaves the state untouched.
        total = -(-n // chunk) * chunk if chunk > 1 else n
        ids = np.zeros((b, total), np.int64)
        mask = np.zeros((b, total), np.int64)
        for i, r in enumerate(rows):
            ids[i, total - len(r) :] = r
            mask[i, total - len(r) :] = 1
        be = self.backend
        be.allocate(b)
        be.reset()
        every = self.manifest.logits == "all"
        gathered = np.zeros((b, total, self.manifest.vocab_size), np.float32) if collect_all else None
        logits = None
        for start in range(0, total, chunk):
            sl = slice(start, start + chunk)
            if not mask[:, sl].any():
                continue
            if collect_all and not every:
                # A last-logits graph scores one position per step.
                for t in range(start, start + chunk):
                    if mask[:, t].any():
                        out = be.step(ids[:, t : t + 1], mask[:, t : t + 1])
                        gathered[:, t] = out[:, -1]
                continue
            out = be.step(ids[:, sl], mask[:, sl])
            if collect_all:
                gathered[:, sl] = out
            logits = out[:, -1]
        if collect_all:
            return gathered[:, total - n :]
        return np.array(logits, dtype=np.float32)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise DiJiangError("no tokenizer in this export folder: pass token ids instead of text")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise DiJiangError("this tokenizer has no chat template; run without --chat")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def _eos_ids(self) -> set[int]:
        eos = self.manifest.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # -- public API ---------------------------------------------------------------

    def score(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits for every position, ``[B, N, V]`` float32, computed in chunks.

        Rows must all have length N (no padding).
        """
        arr = np.asarray(input_ids, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise DiJiangError(f"input_ids must be a non-empty [B, N] array, got shape {arr.shape}")
        return self._prefill(arr.tolist(), collect_all=True)

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        chat: bool = False,
    ) -> GenerationResult | GenerationStream:
        """Generate from one prompt or a batch of prompts (text or token ids).

        Greedy by default. Batch rows may differ in length. With ``stream``
        returns a :class:`GenerationStream` of :class:`StreamEvent`; its
        ``result`` (the full :class:`GenerationResult`) is set once the
        stream is exhausted.
        """
        rows = self._rows(prompt, chat)
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
        try:
            sampler = Sampler(options)
        except ValueError as exc:
            raise DiJiangError(str(exc)) from None
        if max_new_tokens < 1:
            raise DiJiangError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        run = self._run(rows, max_new_tokens, sampler, list(stop or []))
        events = GenerationStream(run)
        if stream:
            return events
        for _ in events:
            pass
        assert events.result is not None
        return events.result

    def _rows(self, prompt, chat: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt, chat)]
        items = list(prompt)
        if not items:
            raise DiJiangError("empty prompt: give at least one token")
        if all(isinstance(x, (int, np.integer)) for x in items):
            return [[int(x) for x in items]]
        if all(isinstance(x, str) for x in items):
            return [self.encode(x, chat) for x in items]
        return [[int(t) for t in row] for row in items]

    def _run(self, rows: list[list[int]], max_new: int, sampler: Sampler, stop: list[str]):
        b = len(rows)
        stats = GenerationStats(prompt_tokens=sum(len(r) for r in rows))
        limit = self.manifest.position_limit
        t0 = time.perf_counter()
        logits = self._prefill(rows)
        stats.prefill_seconds = time.perf_counter() - t0
        eos = self._eos_ids()
        generated: list[list[int]] = [[] for _ in range(b)]
        texts = [""] * b
        reasons = ["length"] * b
        done = np.zeros(b, bool)
        detok = [_Detokenizer(self.tokenizer) for _ in range(b)]
        ids = np.zeros((b, 1), np.int64)
        mask = np.ones((b, 1), np.int64)
        decode_start = time.perf_counter()
        for step in range(max_new):
            for i in range(b):
                if done[i]:
                    continue
                seen = np.asarray(rows[i] + generated[i], np.int64)
                tok = sampler(logits[i], seen)
                if tok in eos:
                    done[i], reasons[i] = True, "eos"
                    continue
                generated[i].append(tok)
                piece = ""
                if self.tokenizer is not None:
                    piece = detok[i].push(generated[i])
                    texts[i] += piece
                    if any(s in texts[i] for s in stop):
                        done[i], reasons[i] = True, "stop"
                yield StreamEvent(i, tok, piece)
                ids[i, 0] = tok
                if limit is not None and len(rows[i]) + len(generated[i]) >= limit:
                    done[i], reasons[i] = True, "position_limit"
            stats.new_tokens = max(len(g) for g in generated) if generated else 0
            if done.all() or step == max_new - 1:
                break
            mask[:, 0] = (~done).astype(np.int64)
            logits = np.array(self.backend.step(ids, mask)[:, -1], dtype=np.float32)
            stats.decode_steps += 1
        stats.decode_seconds = time.perf_counter() - decode_start
        texts = [_cut_at_stop(t, stop) for t in texts]
        yield GenerationResult(generated, texts, reasons, stats)


class _Detokenizer:
    """Incremental decoding in O(1) per token.

    Decodes a short window of recent tokens and emits only text that became
    final, so multi-byte characters split across tokens are not printed
    half-way (a trailing U+FFFD means "wait for the next token").
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = 0
        self.read = 0

    def push(self, tokens: list[int]) -> str:
        dec = self.tokenizer.decode
        before = dec(tokens[self.prefix : self.read], skip_special_tokens=True)
        after = dec(tokens[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(tokens)
            return after[len(before) :]
        return ""


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        j = text.find(s)
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers' errors for missing/bad files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{folder}: cannot load the tokenizer saved beside the graph ({reason}); copy tokenizer.json and "
            "tokenizer_config.json from the checkpoint, or pass token ids (load_tokenizer=False)"
        ) from None
