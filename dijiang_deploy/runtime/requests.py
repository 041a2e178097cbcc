"""What goes into and comes out of the :class:`~.engine.Engine`: requests, their handles and outputs.

A :class:`RequestHandle` is the one object shared by the scheduler thread
(which emits token events and the final output) and the caller (who
iterates, awaits or cancels), so it is thread-safe on both sides.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..contract.errors import DiJiangError
from ..contract.statefile import SequenceState
from .sampling import SamplingParams
from .session import Session, TokenEvent

if TYPE_CHECKING:
    from .engine import Engine


#: finish_reason values of a :class:`RequestOutput`.
ENGINE_FINISH_REASONS = ("eos", "length", "stop", "position_limit", "cancelled", "error")


class QueueFullError(DiJiangError):
    """The engine's waiting queue is at ``max_queue``: retry later."""


class EngineClosedError(DiJiangError):
    """The engine was closed and takes no more requests."""


@dataclass
class Request:
    """What to generate.

    Attributes:
        prompt: token ids fed after the start state (may be empty when
            ``start`` has logits to sample from).
        max_new_tokens: most tokens to generate (>= 1).
        sampling: per-request sampling parameters and seed.
        stop: stop strings (the output is cut just before the first one).
        stop_token_ids: tokens that end generation (kept in the output).
        start: continue from a session or a saved state (copied; a session
            given here is updated with the final state when the request ends).
        return_state: put the final state in :attr:`RequestOutput.state`
            (the last token is fed first, so the state covers the output).
        return_prompt_state: also capture the state right after the prompt.
        include_stop_str_in_output: keep the stop string in the text.
    """

    prompt: Sequence[int] = ()
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    start: SequenceState | Session | None = None
    return_state: bool = False
    return_prompt_state: bool = False
    request_id: str | None = None


@dataclass
class RequestOutput:
    """A finished request.

    ``cached_tokens`` is the length of the start state (tokens not fed by
    this request); ``prompt_tokens`` counts the start and the prompt.
    Times are seconds since :meth:`Engine.submit`.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    error: str | None = None
    state: SequenceState | None = None
    prompt_state: SequenceState | None = None
    queued_seconds: float = 0.0
    first_token_seconds: float | None = None
    total_seconds: float = 0.0
    token_seconds: list[float] = field(default_factory=list)
    decode_steps: int = 0
    #: ``time.perf_counter()`` at submit: the origin of the times above.
    submitted_at: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """A submitted request: stream its tokens, wait for its output, or cancel it."""

    def __init__(self, engine: "Engine", request_id: str, loop: asyncio.AbstractEventLoop | None,
                 sink: Callable[[Any], None] | None = None):
        self.engine = engine
        self.request_id = request_id
        self.output: RequestOutput | None = None
        self._loop = loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sink = sink
        self._done = threading.Event()

    # -- producer side (scheduler thread) -------------------------------------

    def _emit(self, item: TokenEvent | RequestOutput) -> bool:
        """Deliver an event; False when the consumer's event loop is gone."""
        if isinstance(item, RequestOutput):
            self.output = item
        if self._sink is not None:
            self._sink(self, item)
        elif self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:  # the loop was closed
                if isinstance(item, RequestOutput):
                    self._done.set()
                return False
        else:
            self._queue.put(item)
        if isinstance(item, RequestOutput):
            self._done.set()
        return True

    # -- consumer side ----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the output follows with ``finish_reason == "cancelled"``."""
        self.engine._cancel(self.request_id)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None or self._sink is not None:
            raise DiJiangError("this handle streams elsewhere (asyncio or a sink); iterate that instead")
        while True:
            item = self._queue.get()
            if isinstance(item, RequestOutput):
                return
            yield item

    async def stream(self):
        """Async iterator of :class:`TokenEvent` (handles from :meth:`Engine.asubmit`)."""
        if self._aqueue is None:
            raise DiJiangError("this handle was not submitted with asubmit(); iterate it synchronously")
        while True:
            item = await self._aqueue.get()
            if isinstance(item, RequestOutput):
                return
            yield item

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until the request ends (consuming any unread stream)."""
        if self._loop is None and self._sink is None:
            for _ in self:
                pass
        elif not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} still running after {timeout}s")
        assert self.output is not None
        return self.output

    async def aresult(self) -> RequestOutput:
        async for _ in self.stream():
            pass
        assert self.output is not None
        return self.output


@dataclass
class EngineStats:
    """Counters of the scheduler (read without a lock: approximate while running)."""

    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    running: int = 0
    waiting: int = 0
