"""Continuous batching over one model: requests join and leave between steps.

One scheduler thread owns two lanes of the model (:mod:`.ort_backend`):

* the **decode lane**, ``max_batch`` rows: every running request that is
  generating has a row, and one step feeds each its last token;
* the **prefill lane**, ``prefill_rows`` rows: requests whose prompt is
  still being fed, a chunk per step.

Each scheduler step runs the decode batch, then one prefill chunk whose
size a per-step token budget bounds (``step_tokens``), so a long prompt
arriving delays the streams already decoding by one chunk per token
instead of by its whole prefill. Two runs rather than one padded
rectangle: in a ``[B, L]`` step every decoding row would pay for L
positions (docs/serving.md has the measurement).

Requests leave the moment they finish or are cancelled; the last row moves
into the hole (one 4.2 MiB copy for SmolLM2), so live rows stay contiguous
and a step runs only them. A request can start from a session or a saved
state (its state is copied into a row) and hand its final state back.

Thread-safe: :meth:`Engine.submit` and :meth:`RequestHandle.cancel` from any
thread; results stream to a plain iterator or, for handles submitted with
:meth:`Engine.asubmit`, to an asyncio iterator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from ..contract.errors import DiJiangError
from ..contract.statefile import SequenceState, check_same_model
from .chunks import plan_chunks
from .requests import EngineClosedError, EngineStats, QueueFullError, Request, RequestHandle, RequestOutput
from .sampling import SamplingParams, SplitMix64, TokenSampler
from .session import Session, TokenEvent
from .step_costs import StepCosts
from .text import StopMatcher, StreamDecoder

log = logging.getLogger(__name__)

class _Job:
    """A request inside the scheduler."""

    __slots__ = (
        "handle", "req", "sampler", "decoder", "matcher", "todo", "cursor", "tokens", "generated", "pieces", "pending",
        "finalize", "reason", "t_submit", "t_start", "t_first", "times", "start_tokens", "prompt_state", "error",
        "decode_steps", "logits",
    )

    def __init__(self, handle: RequestHandle, req: Request, start_tokens: list[int], model) -> None:
        self.handle, self.req = handle, req
        self.start_tokens = start_tokens
        self.tokens = list(start_tokens)  # fed so far
        self.todo = list(req.prompt)
        self.cursor = 0
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.pending: int | None = None  # sampled, to be fed by the next decode step
        self.finalize = False  # feeding its last token only, then done
        self.reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_start = 0.0
        self.t_first: float | None = None
        self.times: list[float] = []
        self.prompt_state: SequenceState | None = None
        self.error: str | None = None
        self.decode_steps = 0
        self.logits: np.ndarray | None = None
        tok = model.tokenizer
        self.decoder = StreamDecoder(tok) if tok is not None else None
        self.matcher = StopMatcher(req.stop)
        self.sampler: TokenSampler | None = None

    @property
    def remaining(self) -> int:
        return len(self.todo) - self.cursor


class Engine:
    """Continuous batching over one :class:`~dijiang_deploy.runtime.model.Model`.

    Args:
        model: the opened export.
        max_batch: most requests running at once (decode lane rows).
        prefill_rows: most requests whose prompts are fed at once.
        step_tokens: per-step budget of prefill token positions (rows x chunk
            length). Default None: while requests are decoding, the budget is
            sized from measured step times so that a prefill chunk adds at most
            ``(itl_ratio - 1)`` decode steps to the decoding streams' gap
            (:class:`StepCosts`); with nothing decoding, whole chunks.
        itl_ratio: the decoding streams' largest inter-token gap during a
            prefill, as a multiple of a decode step, that the default budget
            aims for.
        warmup: run every step shape once at start (all padding, so no state
            changes): ONNX Runtime's first run of a shape allocates and picks
            kernels, which would otherwise show as one slow token in a stream.
        max_queue: most requests waiting to start (None: unbounded);
            :meth:`submit` raises :class:`QueueFullError` past it.
        max_context: refuse requests whose prompt plus ``max_new_tokens``
            exceeds this many tokens (None: no limit beyond the model's).
        on_step: called after every graph run with ``(kind, request_ids,
            chunk_length)``, kind ``"decode"`` or ``"prefill"`` (tracing,
            metrics); it runs on the scheduler thread, so keep it short.
    """

    def __init__(self, model, max_batch: int = 16, prefill_rows: int = 4, step_tokens: int | None = None,
                 max_queue: int | None = None, max_context: int | None = None,
                 on_step: Callable[[str, list[str], int], None] | None = None, itl_ratio: float = 2.0,
                 warmup: bool = False):
        if max_batch < 1 or prefill_rows < 1:
            raise DiJiangError(f"max_batch and prefill_rows must be >= 1, got {max_batch}, {prefill_rows}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_rows = min(prefill_rows, max_batch)
        self.step_tokens = step_tokens
        if step_tokens is not None and step_tokens < 1:
            raise DiJiangError(f"step_tokens must be >= 1, got {step_tokens}")
        if itl_ratio <= 1.0:
            raise DiJiangError(f"itl_ratio must be > 1, got {itl_ratio}")
        self.itl_ratio = itl_ratio
        self.costs = StepCosts()
        self.max_queue = max_queue
        self.max_context = max_context
        self.on_step = on_step
        self.stats = EngineStats()
        self._decode_lane = model.lane(max_batch, (1,))
        self._prefill_lane = model.lane(self.prefill_rows, model.prefill_lengths)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[_Job] = deque()
        self._cancels: set[str] = set()
        self._waiting: deque[_Job] = deque()
        self._prefill: list[_Job] = []
        self._decode: list[_Job] = []
        self._ids = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        if warmup:
            self.warm_up()

    def warm_up(self) -> None:
        """Run each (rows, chunk length) shape of both lanes once, all padding (nothing changes).

        The prefill lane's shapes then run once more, timed, to seed the
        step-cost estimates: without them the first prefill step beside
        decoding streams is sized by a guess (``StepCosts.UNTIMED_BUDGET``)
        and can be the longest gap those streams see. First runs allocate,
        so they are not timed.
        """
        for lane in (self._decode_lane, self._prefill_lane):
            for rows in lane.buckets:
                for length in lane.lengths:
                    zeros = np.zeros((rows, length), np.int64)
                    lane.step(zeros, zeros)
        lane = self._prefill_lane
        for rows in lane.buckets:
            for length in lane.lengths:
                zeros = np.zeros((rows, length), np.int64)
                t0 = time.perf_counter()
                lane.step(zeros, zeros)
                self.costs.prefilled(rows * length, time.perf_counter() - t0)

    # -- public API -----------------------------------------------------------

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None,
               sink: Callable[[RequestHandle, Any], None] | None = None) -> RequestHandle:
        """Queue a request; returns at once.

        Raises:
            DiJiangError: an invalid request (empty prompt with nothing to
                continue from, bad token ids, past the position or context
                limit, a start state of another model).
            QueueFullError: ``max_queue`` requests are already waiting.
            EngineClosedError: after :meth:`close`.
        """
        job = self._validate(request, loop, sink)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self.max_queue is not None and len(self._incoming) + len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._incoming.append(job)
            self.stats.waiting = len(self._incoming) + len(self._waiting)
            self._ensure_thread()
            self._wake.notify()
        return job.handle

    async def asubmit(self, request: Request) -> RequestHandle:
        """:meth:`submit` from a coroutine: the handle streams to this event loop."""
        return self.submit(request, loop=asyncio.get_running_loop())

    def generate(self, request: Request) -> RequestOutput:
        """Submit and wait."""
        return self.submit(request).result()

    def close(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; cancel (or finish) what runs, then stop the thread."""
        with self._lock:
            self._closed = True
            if cancel:
                self._cancels.update(j.handle.request_id for j in [*self._incoming, *self._waiting, *self._prefill, *self._decode])
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def running(self) -> int:
        return len(self._prefill) + len(self._decode)

    @property
    def waiting(self) -> int:
        return len(self._incoming) + len(self._waiting)

    # -- validation (caller's thread) -------------------------------------------

    def _validate(self, req: Request, loop, sink) -> _Job:
        model = self.model
        if not isinstance(req.sampling, SamplingParams):
            raise DiJiangError("sampling must be a SamplingParams")
        if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise DiJiangError(f"max_new_tokens must be an integer >= 1, got {req.max_new_tokens!r}")
        prompt = model.check_tokens(req.prompt)
        model.check_tokens(req.stop_token_ids)
        if any(not isinstance(s, str) for s in req.stop):
            raise DiJiangError("stop strings must be text")
        if req.stop and model.tokenizer is None:
            raise DiJiangError("stop strings need a tokenizer in the export folder")
        start_tokens: list[int] = []
        start = req.start
        if isinstance(start, Session):
            if start.model is not model:
                check_same_model(start.model.identity, model.identity, "session")
            start_tokens = list(start.tokens)
            has_logits = start.logits is not None
        elif isinstance(start, SequenceState):
            check_same_model(start.model, model.identity, "start state")
            start_tokens = [int(t) for t in start.tokens]
            has_logits = start.logits is not None
        elif start is None:
            has_logits = False
        else:
            raise DiJiangError(f"start must be a Session or a SequenceState, got {type(start).__name__}")
        if not prompt and not has_logits:
            raise DiJiangError("empty prompt: give at least one token (or a start state to continue from)")
        total = len(start_tokens) + len(prompt)
        model.check_length(total)
        if self.max_context is not None and total + req.max_new_tokens > self.max_context:
            raise DiJiangError(
                f"prompt of {total} tokens plus max_new_tokens {req.max_new_tokens} exceeds the context limit "
                f"of {self.max_context} tokens"
            )
        req = Request(**{**req.__dict__, "prompt": prompt})
        rid = req.request_id or f"req-{next(self._ids)}"
        job = _Job(RequestHandle(self, rid, loop, sink), req, start_tokens, model)
        return job

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
            self._wake.notify()

    # -- the scheduler (its own thread) -----------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="dijiang-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._incoming or self._cancels or self._waiting or self._prefill or self._decode):
                    if self._closed:
                        return
                    self._wake.wait()
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancels, self._cancels = self._cancels, set()
                closing = self._closed
            try:
                self._apply_cancels(cancels)
                self._admit()
                if self._decode:
                    self._decode_step()
                if self._prefill:
                    self._prefill_step()
            except Exception as exc:  # a backend failure: fail what runs, keep serving
                log.exception("engine step failed")
                for job in [*self._prefill, *self._decode]:
                    job.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    self._finish(job, "error", None)
                self._prefill, self._decode = [], []
            self.stats.running = self.running
            self.stats.waiting = len(self._waiting) + len(self._incoming)
            if closing and not (self._waiting or self._prefill or self._decode or self._incoming):
                return

    def _apply_cancels(self, cancels: set[str]) -> None:
        if not cancels:
            return
        for job in [j for j in self._waiting if j.handle.request_id in cancels]:
            self._waiting.remove(job)
            self._finish(job, "cancelled", None)
        for lane_jobs, lane in ((self._decode, self._decode_lane), (self._prefill, self._prefill_lane)):
            rows = [i for i, j in enumerate(lane_jobs) if j.handle.request_id in cancels]
            for i in sorted(rows, reverse=True):
                job = lane_jobs[i]
                self._finish(job, "cancelled", lane.read_row(i) if self._wants_state(job) else None)
                self._remove_row(lane_jobs, lane, i)

    def _admit(self) -> None:
        while self._waiting and self.running < self.max_batch:
            job = self._waiting[0]
            needs_prefill = job.remaining > 0
            if needs_prefill and len(self._prefill) >= self.prefill_rows:
                break
            self._waiting.popleft()
            job.t_start = time.perf_counter()
            layers, logits, rng = self._start_state(job)
            job.sampler = TokenSampler(job.req.sampling, self.model.vocab_size, job.tokens + job.todo, rng=rng)
            if needs_prefill:
                self._prefill_lane.write_row(len(self._prefill), layers, len(job.tokens))
                self._prefill.append(job)
            else:
                # Nothing to feed: the first token comes from the start state's logits.
                if job.req.return_prompt_state:
                    job.prompt_state = self._snapshot(job, layers, logits)
                self._first_token(job, logits, layers)

    def _start_state(self, job: _Job) -> tuple[list[np.ndarray] | None, np.ndarray | None, SplitMix64 | None]:
        start = job.req.start
        if start is None:
            return None, None, None
        if isinstance(start, Session):
            rng = start.rng if job.req.sampling.seed is None else None
            return start.layers(), start.logits, rng
        rng = SplitMix64.from_record(start.sampler) if start.sampler and job.req.sampling.seed is None else None
        return start.layers, start.logits, rng

    # -- decode -----------------------------------------------------------------

    def _decode_step(self) -> None:
        jobs = self._decode
        ids = np.array([[j.pending] for j in jobs], np.int64)
        t0 = time.perf_counter()
        logits = self._decode_lane.step(ids, np.ones_like(ids))
        self.costs.decoded(time.perf_counter() - t0)
        self.stats.steps += 1
        self.stats.decode_steps += 1
        if self.on_step is not None:
            self.on_step("decode", [j.handle.request_id for j in jobs], 1)
        done: list[int] = []
        for i, job in enumerate(jobs):
            job.tokens.append(job.pending)
            job.pending = None
            job.decode_steps += 1
            if job.finalize:  # its last token is in the state now
                job.logits = np.array(logits[i, -1], np.float32)
                done.append(i)
                continue
            reason = self._next_token(job, logits[i, -1])
            if reason is None:
                continue
            job.reason = reason
            if self._needs_final_feed(job):
                job.finalize = True  # one more step feeds the last token, then the state goes back
                continue
            done.append(i)
        # Descending, so moving the last row into a hole never touches a row still to be handled.
        for i in reversed(done):
            job = jobs[i]
            layers = self._decode_lane.read_row(i) if self._wants_state(job) else None
            if layers is not None and job.logits is None:
                job.logits = np.array(logits[i, -1], np.float32)
            self._finish(job, job.reason, layers)
            self._remove_row(self._decode, self._decode_lane, i)

    def _next_token(self, job: _Job, logits: np.ndarray) -> str | None:
        """Sample, emit, and say why the request ends (None: it goes on)."""
        token = job.sampler(logits)
        now = time.perf_counter()
        if token in self.model.eos_ids:
            job.logits = np.array(logits, np.float32)
            return "eos"
        job.generated.append(token)
        job.sampler.observe(token)
        self.stats.generated_tokens += 1
        text = job.matcher.push(job.decoder.push(token)) if job.decoder is not None else ""
        job.pieces.append(text)
        if job.t_first is None:
            job.t_first = now
        job.times.append(now - job.t_submit)
        if not job.handle._emit(TokenEvent(token, text)):
            return "cancelled"
        job.pending = token
        if job.matcher.stopped or token in job.req.stop_token_ids:
            return "stop"
        limit = self.model.manifest.position_limit
        if limit is not None and len(job.tokens) + 1 >= limit:
            job.pending = None
            return "position_limit"
        if len(job.generated) >= job.req.max_new_tokens:
            return "length"
        return None

    def _wants_state(self, job: _Job) -> bool:
        return job.req.return_state or isinstance(job.req.start, Session)

    def _needs_final_feed(self, job: _Job) -> bool:
        return self._wants_state(job) and job.reason in ("length", "stop") and job.pending is not None

    # -- prefill ----------------------------------------------------------------

    def _prefill_step(self) -> None:
        jobs = self._prefill
        k = len(jobs)
        lane = self._prefill_lane
        budget = max(1, self._prefill_budget() // lane.bucket(k))
        fitting = [n for n in lane.lengths if n <= budget] or [lane.lengths[0]]
        if k == 1:
            length = plan_chunks(jobs[0].remaining, fitting)[0][0]
        else:
            longest = max(j.remaining for j in jobs)
            length = next((n for n in fitting if n >= longest), fitting[-1])
        ids = np.zeros((k, length), np.int64)
        mask = np.zeros((k, length), np.int64)
        for i, job in enumerate(jobs):
            take = min(length, job.remaining)
            if take:
                ids[i, length - take:] = job.todo[job.cursor : job.cursor + take]
                mask[i, length - take:] = 1
        t0 = time.perf_counter()
        logits = lane.step(ids, mask)
        self.costs.prefilled(lane.bucket(k) * length, time.perf_counter() - t0)
        self.stats.steps += 1
        self.stats.prefill_steps += 1
        if self.on_step is not None:
            self.on_step("prefill", [j.handle.request_id for j in jobs], length)
        finished = []
        for i, job in enumerate(jobs):
            take = int(mask[i].sum())
            if take:
                job.tokens.extend(job.todo[job.cursor : job.cursor + take])
                job.cursor += take
                self.stats.prefill_tokens += take
                if job.remaining == 0:
                    finished.append((i, np.array(logits[i, -1], np.float32)))
        for i, last in sorted(finished, key=lambda x: x[0], reverse=True):
            job = jobs[i]
            layers = lane.read_row(i)
            if job.req.return_prompt_state:
                job.prompt_state = self._snapshot(job, layers, last)
            self._remove_row(self._prefill, lane, i)
            self._first_token(job, last, layers)

    def _prefill_budget(self) -> int:
        """Token positions the next prefill step may use."""
        if self.step_tokens is not None:
            return self.step_tokens
        whole = self.model.manifest.max_chunk * self.prefill_rows
        if not self._decode:
            return whole
        return min(whole, self.costs.budget(self.itl_ratio))

    def _first_token(self, job: _Job, logits: np.ndarray | None, layers: list[np.ndarray] | None) -> None:
        """After the prompt: sample the first token; the job joins the decode lane or ends."""
        assert logits is not None
        reason = self._next_token(job, logits)
        job.reason = reason
        if reason is None or self._needs_final_feed(job):
            job.finalize = reason is not None
            row = len(self._decode)
            self._decode_lane.write_row(row, layers, len(job.tokens))
            self._decode.append(job)
            return
        self._finish(job, reason, layers if self._wants_state(job) else None)

    # -- leaving ----------------------------------------------------------------

    def _remove_row(self, jobs: list[_Job], lane, i: int) -> None:
        last = len(jobs) - 1
        if i != last:
            lane.move_row(last, i)
            jobs[i] = jobs[last]
        jobs.pop()

    def _snapshot(self, job: _Job, layers: list[np.ndarray] | None, logits: np.ndarray | None) -> SequenceState:
        if layers is None:
            h, d1, d2 = self.model.manifest.state_shape
            layers = [np.zeros((h, d1, d2), np.float32) for _ in range(self.model.manifest.num_layers)]
        rng = job.sampler.rng.to_record() if job.sampler is not None else None
        return SequenceState(self.model.identity, layers, np.asarray(job.tokens, np.int32),
                             None if logits is None else np.asarray(logits, np.float32), rng)

    def _finish(self, job: _Job, reason: str, layers: list[np.ndarray] | None) -> None:
        if job.decoder is not None and not job.matcher.stopped and reason not in ("error",):
            tail = job.matcher.push(job.decoder.flush()) + job.matcher.flush()
            if tail:
                job.pieces.append(tail)
                job.handle._emit(TokenEvent(None, tail))
        kept = job.generated[: job.matcher.tokens_kept()] if job.matcher.stopped else job.generated
        state = None
        if layers is not None:
            state = self._snapshot(job, layers, job.logits)
            if isinstance(job.req.start, Session):
                job.req.start.restore(state)
        now = time.perf_counter()
        out = RequestOutput(
            request_id=job.handle.request_id,
            token_ids=list(kept),
            text="".join(job.pieces),
            finish_reason=reason,
            prompt_tokens=len(job.start_tokens) + len(job.todo),
            cached_tokens=len(job.start_tokens),
            error=job.error,
            state=state if job.req.return_state else None,
            prompt_state=job.prompt_state,
            queued_seconds=(job.t_start or now) - job.t_submit,
            first_token_seconds=None if job.t_first is None else job.t_first - job.t_submit,
            total_seconds=now - job.t_submit,
            token_seconds=job.times,
            decode_steps=job.decode_steps,
            submitted_at=job.t_submit,
        )
        self.stats.finished += 1
        job.handle._emit(out)
