"""``Generator``: generate and score with one call, over sessions and the engine.

One prompt runs on its own :class:`~.session.Session`; a batch of prompts
runs on a private :class:`~.engine.Engine` (rows leave as they finish).
Every call has its own state, so calls on one Generator never disturb each
other, streams included.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..contract.errors import DiJiangError
from ..contract.manifest import Manifest
from .chunks import plan_chunks
from .engine import Engine
from .model import Model
from .requests import Request, RequestOutput
from .sampling import SamplingParams
from .session import GenerationStats, TokenEvent

__all__ = ["GenerationResult", "GenerationStats", "GenerationStream", "Generator", "StreamEvent"]


@dataclass
class GenerationResult:
    """Generated ids per row (prompt excluded), their text, why each stopped, timing."""

    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class StreamEvent:
    """One generated token of row ``row``; ``text`` is its newly decoded text
    (``token_id`` None: only the text held back until the end)."""

    row: int
    token_id: int | None
    text: str


class GenerationStream:
    """What ``generate(..., stream=True)`` returns: an iterator of :class:`StreamEvent`.

    ``result`` (the :class:`GenerationResult`) is None until it is exhausted.
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
    call and reused for every token.
    """

    def __init__(self, model: Model):
        self.model = model
        self.manifest: Manifest = model.manifest
        self.tokenizer = model.tokenizer

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        threads: int | None = None,
        load_tokenizer: bool = True,
    ) -> "Generator":
        """Open an export folder (see :meth:`Model.open`)."""
        return cls(Model.open(folder, backend=backend, providers=providers, threads=threads, load_tokenizer=load_tokenizer))

    # -- text -----------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        tok = self.model.require_tokenizer()
        if chat:
            return tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tok.encode(prompt)

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

    # -- scoring ----------------------------------------------------------------

    def score(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits for every position, ``[B, N, V]`` float32, fed in chunks.

        Rows must all have length N (no padding). A ``--logits last`` export
        scores one position per step.
        """
        arr = np.asarray(input_ids, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise DiJiangError(f"input_ids must be a non-empty [B, N] array, got shape {arr.shape}")
        b, n = arr.shape
        self.model.check_tokens(arr.reshape(-1).tolist())
        self.model.check_length(n)
        every = self.manifest.logits == "all"
        lane = self.model.lane(b, self.model.prefill_lengths if every else (1,))
        out = np.zeros((b, n, self.manifest.vocab_size), np.float32)
        at = 0
        for length, real in plan_chunks(n, lane.lengths) if every else [(1, 1)] * n:
            ids = np.zeros((b, length), np.int64)
            mask = np.zeros((b, length), np.int64)
            ids[:, length - real:] = arr[:, at : at + real]
            mask[:, length - real:] = 1
            logits = lane.step(ids, mask)
            out[:, at : at + real] = logits[:, -real:] if every else logits[:, -1:]
            at += real
        return out

    # -- generation -----------------------------------------------------------

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
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> GenerationResult | GenerationStream:
        """Generate from one prompt or a batch of prompts (text or token ids).

        Greedy by default; rows may differ in length. With ``stream`` returns
        a :class:`GenerationStream` of :class:`StreamEvent`; its ``result``
        is set once the stream is exhausted. Seeded sampling gives the same
        tokens for a row whatever else is in the batch.

        Raises:
            DiJiangError: an empty prompt, invalid sampling values, past the
                model's position limit.
        """
        rows = self._rows(prompt, chat)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, seed=seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DiJiangError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for r in rows:
            if not r:
                raise DiJiangError("empty prompt: give at least one token")
            self.model.check_tokens(r)
            self.model.check_length(len(r))
        stops = list(stop or [])
        run = self._one(rows[0], max_new_tokens, params, stops) if len(rows) == 1 else self._batch(rows, max_new_tokens, params, stops)
        events = GenerationStream(run)
        if stream:
            return events
        for _ in events:
            pass
        assert events.result is not None
        return events.result

    def _one(self, row: list[int], max_new: int, params: SamplingParams, stop: list[str]):
        session = self.model.session()
        t0 = time.perf_counter()
        session.append(row)
        prefill = time.perf_counter() - t0
        inner = session.generate(max_new, params, stop=stop, stream=True, feed_last=False)
        for ev in inner:
            yield StreamEvent(0, ev.token_id, ev.text)
        out = inner.output
        assert out is not None
        out.stats.prompt_tokens = len(row)
        out.stats.prefill_seconds = prefill
        yield GenerationResult([out.token_ids], [out.text], [out.finish_reason], out.stats)

    def _batch(self, rows: list[list[int]], max_new: int, params: SamplingParams, stop: list[str]):
        events: queue.SimpleQueue = queue.SimpleQueue()
        index: dict[str, int] = {}

        def sink(handle, item) -> None:
            events.put((index[handle.request_id], item))

        engine = Engine(self.model, max_batch=len(rows), prefill_rows=len(rows),
                        step_tokens=self.manifest.max_chunk * len(rows))
        t0 = time.perf_counter()
        try:
            for i, row in enumerate(rows):
                rid = f"row-{i}"
                index[rid] = i
                engine.submit(Request(row, max_new, params, stop, request_id=rid), sink=sink)
            outputs: dict[int, RequestOutput] = {}
            while len(outputs) < len(rows):
                i, item = events.get()
                if isinstance(item, TokenEvent):
                    yield StreamEvent(i, item.token_id, item.text)
                else:
                    outputs[i] = item
        finally:
            engine.close()
        total = time.perf_counter() - t0
        outs = [outputs[i] for i in range(len(rows))]
        failed = [o for o in outs if o.finish_reason == "error"]
        if failed:
            raise DiJiangError(f"generation failed: {failed[0].error}")
        first = max((o.first_token_seconds or 0.0) for o in outs)
        stats = GenerationStats(
            prompt_tokens=sum(len(r) for r in rows),
            new_tokens=max(len(o.token_ids) for o in outs),
            prefill_seconds=first,
            decode_seconds=max(0.0, total - first),
            decode_steps=max(o.decode_steps for o in outs),
        )
        yield GenerationResult([o.token_ids for o in outs], [o.text for o in outs], [o.finish_reason for o in outs], stats)
