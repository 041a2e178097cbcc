"""A session: one sequence's recurrent state, position, token history and sampling RNG.

The state is the whole conversation, at a fixed size. A session appends
tokens (prefill in chunks) and generates from where it is, so turn k of a
chat feeds only its own new tokens; it forks cheaply (a copy of the state),
and saves to and loads from a state file (:mod:`~dijiang_deploy.contract.statefile`).

A session runs steps on its own one-row lane of the model; the
:class:`~dijiang_deploy.runtime.engine.Engine` batches many sessions instead.
A session is not thread-safe: use it from one thread at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._version import __version__
from ..contract.errors import DiJiangError
from ..contract.statefile import SequenceState, StateFileError, check_same_model
from .chunks import plan_chunks
from .sampling import SamplingParams, SplitMix64, TokenSampler
from .text import StopMatcher, StreamDecoder
from .tokenizer import Message

#: Why generation ended: the model's end-of-sequence token, max_new_tokens,
#: a stop string or stop token id, the decay tables' last position.
FINISH_REASONS = ("eos", "length", "stop", "position_limit")


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of one generation.

    ``decode_steps`` counts the one-token graph runs: the first new token
    comes from the prompt's logits, and the step that produced an
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
class GenerationOutput:
    """One sequence's generated tokens (cut at a stop string), their text, why it stopped."""

    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class TokenEvent:
    """One generated token and the text it completed (may be empty: a partial
    character, or text held back while it may still become a stop string).
    ``token_id`` is None for the final event that only flushes held-back text."""

    token_id: int | None
    text: str


class SessionStream:
    """Iterator of :class:`TokenEvent`; ``output`` is set once it is exhausted."""

    def __init__(self, run: Iterator[TokenEvent | GenerationOutput]):
        self._run = run
        self.output: GenerationOutput | None = None

    def __iter__(self) -> "SessionStream":
        return self

    def __next__(self) -> TokenEvent:
        for ev in self._run:
            if isinstance(ev, GenerationOutput):
                self.output = ev
                break
            return ev
        raise StopIteration


class Session:
    """One sequence over a :class:`~dijiang_deploy.runtime.model.Model`.

    Attributes:
        tokens: every token fed so far (the history; ``position == len(tokens)``).
        logits: ``[V]`` float32 after the last fed token, None before the first.
        messages: the chat so far (:meth:`chat`).
    """

    def __init__(self, model, state: SequenceState | None = None):
        self.model = model
        self.tokens: list[int] = []
        self.logits: np.ndarray | None = None
        self.messages: list[Message] = []
        self.rng: SplitMix64 | None = None
        self._lane = None
        self._parked: list[np.ndarray] | None = None  # state while no lane holds it
        self._checkpoint: SequenceState | None = None
        #: Times :meth:`chat` found the rendering diverging from what was fed
        #: and went back to the last turn's checkpoint (or to the start).
        self.rewinds = 0
        #: (tokens, seconds) of the last :meth:`append`.
        self.last_prefill: tuple[int, float] = (0, 0.0)
        if state is not None:
            self.restore(state)

    # -- state ----------------------------------------------------------------
    @property
    def position(self) -> int:
        return len(self.tokens)

    def _lane_row(self):
        if self._lane is None:
            self._lane = self.model.lane(1)
            self._lane.write_row(0, self._parked, self.position)
            self._parked = None
        return self._lane

    def layers(self) -> list[np.ndarray]:
        """The state, per layer ``[H, d, d]`` float32 (copies)."""
        if self._lane is not None:
            return self._lane.read_row(0)
        if self._parked is not None:
            return [a.copy() for a in self._parked]
        h, d1, d2 = self.model.manifest.state_shape
        return [np.zeros((h, d1, d2), np.float32) for _ in range(self.model.manifest.num_layers)]

    def snapshot(self) -> SequenceState:
        """The session as a :class:`~dijiang_deploy.contract.SequenceState` (copies)."""
        return SequenceState(
            self.model.identity, self.layers(), np.asarray(self.tokens, np.int32),
            None if self.logits is None else self.logits.copy(),
            None if self.rng is None else self.rng.to_record(),
            created_by=_created_by(),
            extra={"messages": [{"role": m.role, "content": m.content} for m in self.messages]},
        )

    def restore(self, state: SequenceState) -> None:
        """Become ``state`` (checked against this model).

        Raises:
            StateFileError: the state belongs to another model.
        """
        check_same_model(state.model, self.model.identity)
        self.tokens = [int(t) for t in state.tokens]
        self.logits = None if state.logits is None else np.asarray(state.logits, np.float32).copy()
        self.rng = SplitMix64.from_record(state.sampler) if state.sampler else None
        try:
            self.messages = [Message.coerce(m) for m in state.extra.get("messages", [])]
        except DiJiangError as exc:
            raise StateFileError(f"state file: bad chat history ({exc})") from exc
        if self._lane is not None:
            self._lane.write_row(0, state.layers, self.position)
        else:
            self._parked = [np.asarray(a, np.float32).copy() for a in state.layers]

    def reset(self) -> None:
        """Forget everything: an empty sequence."""
        self.tokens, self.logits, self.messages, self.rng, self._checkpoint = [], None, [], None, None
        if self._lane is not None:
            self._lane.write_row(0, None, 0)
        self._parked = None

    def fork(self) -> "Session":
        """An independent copy (state, history, RNG, chat): for parallel sampling or a shared prefix."""
        other = Session(self.model)
        other.restore(self.snapshot())
        return other

    def save(self, path: str | Path) -> Path:
        """Write the state file atomically (format: docs/state-format.md)."""
        return self.snapshot().save(path)

    def to_bytes(self) -> bytes:
        return self.snapshot().to_bytes()

    @classmethod
    def load(cls, model, path: str | Path) -> "Session":
        """A session from a state file written for ``model``.

        Raises:
            StateFileError: missing, truncated, damaged or foreign file.
        """
        return cls(model, SequenceState.load(path, expect=model.identity))

    @classmethod
    def from_bytes(cls, model, data: bytes) -> "Session":
        return cls(model, SequenceState.from_bytes(data, expect=model.identity))

    # -- feeding --------------------------------------------------------------
    def append(self, tokens: Sequence[int] | str, logits: str = "last") -> np.ndarray | None:
        """Feed ``tokens`` (or text, tokenized without special tokens added).

        Args:
            logits: ``last`` keeps the logits after the last token (and
                returns them, ``[V]``); ``all`` returns every position's
                ``[n, V]`` (needs an export with ``--logits all``, or costs
                one step per token).

        Raises:
            DiJiangError: bad token ids, or past the model's position limit.
        """
        ids = self.model.require_tokenizer().encode(tokens) if isinstance(tokens, str) else self.model.check_tokens(tokens)
        if not ids:
            return self.logits if logits == "last" else np.zeros((0, self.model.vocab_size), np.float32)
        self.model.check_length(self.position + len(ids))
        t0 = time.perf_counter()
        lane = self._lane_row()
        every = logits == "all"
        graph_all = self.model.manifest.logits == "all"
        gathered = np.zeros((len(ids), self.model.vocab_size), np.float32) if every else None
        at = 0
        plan = plan_chunks(len(ids), lane.lengths) if (graph_all or not every) else [(1, 1)] * len(ids)
        for length, real in plan:
            chunk = np.zeros((1, length), np.int64)
            mask = np.zeros((1, length), np.int64)
            chunk[0, length - real:] = ids[at : at + real]
            mask[0, length - real:] = 1
            out = lane.step(chunk, mask)
            if every:
                gathered[at : at + real] = out[0, -real:] if graph_all else out[0, -1:]
            at += real
            self.logits = np.array(out[0, -1], dtype=np.float32)
        self.tokens.extend(ids)
        self.last_prefill = (len(ids), time.perf_counter() - t0)
        return gathered if every else self.logits

    def feed_token(self, token: int) -> np.ndarray:
        """Feed one token (a decode step, no checks); returns the logits ``[V]`` float32."""
        lane = self._lane_row()
        out = lane.step(np.array([[token]], np.int64), np.ones((1, 1), np.int64))
        self.tokens.append(int(token))
        self.logits = np.array(out[0, -1], dtype=np.float32)
        return self.logits

    # -- generating -----------------------------------------------------------
    def generate(
        self,
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        stream: bool = False,
        feed_last: bool = True,
    ) -> GenerationOutput | SessionStream:
        """Generate from where the session is (after :meth:`append`).

        Args:
            sampling: how to pick tokens (default greedy). A seed reseeds the
                session's RNG; without one the RNG continues (or starts fresh).
            stop: stop strings; the returned text and token ids end just before one.
            stop_token_ids: tokens that end generation (kept in the output).
            feed_last: after a ``length`` or ``stop`` finish, feed the last
                token so the state covers everything generated (a chat's next
                turn continues from it). One extra step.

        Raises:
            DiJiangError: nothing to continue from, or bad arguments.
        """
        if self.logits is None:
            raise DiJiangError("the session is empty: append a prompt before generating")
        if max_new_tokens < 1:
            raise DiJiangError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = sampling or SamplingParams()
        stop_ids = set(self.model.check_tokens(stop_token_ids))
        run = _GenerationRun(self, max_new_tokens, sampling, list(stop), stop_ids, feed_last)
        events = SessionStream(run.events())
        if stream:
            return events
        for _ in events:
            pass
        assert events.output is not None
        return events.output

    def _sampler(self, sampling: SamplingParams) -> TokenSampler:
        if sampling.seed is not None or self.rng is None:
            self.rng = SplitMix64(sampling.seed) if sampling.seed is not None else None
        sampler = TokenSampler(sampling, self.model.vocab_size, self.tokens, rng=self.rng)
        self.rng = sampler.rng
        return sampler

    # -- chat -----------------------------------------------------------------
    def chat(self, content: str, role: str = "user", **generate: Any) -> GenerationOutput | SessionStream:
        """Add a message, feed only what it adds to the rendered conversation, and answer.

        The conversation is rendered with the tokenizer's chat template; the
        session feeds the part of the rendering it has not fed yet (the new
        message and the generation prompt), then generates. When the answer
        does not re-tokenize to the tokens generated (a partial character, a
        stop string's cut, a tokenization the model chose that is not the
        canonical one), the session goes back to the checkpoint taken before
        answering and feeds the answer's canonical tokens, so the state always
        equals the conversation rendered in one go, and a saved session
        continues without re-reading history (:attr:`rewinds` counts these).
        ``generate`` takes :meth:`generate`'s arguments.
        """
        tok = self.model.require_tokenizer()
        msgs = [*self.messages, Message(role, content)]
        ids = tok.encode_chat(msgs, add_generation_prompt=True)
        self._continue_to(ids)
        self._checkpoint = self.snapshot()
        self.messages = msgs
        result = self.generate(**generate)
        if isinstance(result, SessionStream):
            return _ChatStream(self, result)
        self._close_turn(result)
        return result

    def _close_turn(self, output: GenerationOutput) -> None:
        """Record the answer; make the state the canonical rendering of the conversation."""
        tok = self.model.require_tokenizer()
        messages = [*self.messages, Message("assistant", output.text)]
        closed = tok.encode_chat(messages, add_generation_prompt=False)
        if closed[: len(self.tokens)] != self.tokens:
            self.rewinds += 1
            ck = self._checkpoint
            if ck is not None and closed[: ck.position] == [int(t) for t in ck.tokens]:
                self.restore(ck)
            else:
                self.reset()
            prompt_stats = self.last_prefill  # what run reports is the turn's prompt, not this repair
            self.append(closed[self.position :])
            self.last_prefill = prompt_stats
        self.messages = messages

    def _continue_to(self, ids: list[int]) -> None:
        n = len(self.tokens)
        if ids[:n] != self.tokens:
            self.rewinds += 1
            ck = self._checkpoint
            if ck is not None and ids[: ck.position] == [int(t) for t in ck.tokens]:
                self.restore(ck)
            else:
                self.reset()
            n = len(self.tokens)
        self.append(ids[n:])


class _ChatStream(SessionStream):
    """A streamed chat answer: closes the turn when exhausted."""

    def __init__(self, session: Session, inner: SessionStream):
        super().__init__(iter(()))
        self._session, self._inner = session, inner

    def __next__(self) -> TokenEvent:
        try:
            return next(self._inner)
        except StopIteration:
            if self.output is None and self._inner.output is not None:
                self.output = self._inner.output
                self._session._close_turn(self.output)
            raise


class _GenerationRun:
    """The decode loop of :meth:`Session.generate` (a generator of events)."""

    def __init__(self, session: Session, max_new: int, sampling: SamplingParams, stop: list[str], stop_ids: set[int],
                 feed_last: bool):
        self.s, self.max_new, self.sampling = session, max_new, sampling
        self.stop, self.stop_ids, self.feed_last = stop, stop_ids, feed_last

    def events(self) -> Iterator[TokenEvent | GenerationOutput]:
        s = self.s
        model = s.model
        sampler = s._sampler(self.sampling)
        tok = model.tokenizer
        decoder = StreamDecoder(tok) if tok is not None else None
        matcher = StopMatcher(self.stop)
        if matcher.stops and decoder is None:
            raise DiJiangError("stop strings need a tokenizer in the export folder")
        stats = GenerationStats()
        generated: list[int] = []
        pieces: list[str] = []
        reason = "length"
        limit = model.manifest.position_limit
        logits = s.logits
        t0 = time.perf_counter()
        while len(generated) < self.max_new:
            token = sampler(logits)
            if token in model.eos_ids:
                reason = "eos"
                break
            generated.append(token)
            sampler.observe(token)
            text = matcher.push(decoder.push(token)) if decoder is not None else ""
            pieces.append(text)
            yield TokenEvent(token, text)
            if matcher.stopped or token in self.stop_ids:
                reason = "stop"
                break
            if limit is not None and s.position + 1 >= limit:
                reason = "position_limit"
                break
            if len(generated) == self.max_new:
                break
            logits = s.feed_token(token)
            stats.decode_steps += 1
        if decoder is not None and not matcher.stopped:
            tail = matcher.push(decoder.flush()) + matcher.flush()
            if tail:
                pieces.append(tail)
                yield TokenEvent(None, tail)
        if generated and self.feed_last and reason in ("length", "stop"):
            s.feed_token(generated[-1])
        stats.decode_seconds = time.perf_counter() - t0
        stats.new_tokens = len(generated)
        kept = generated[: matcher.tokens_kept()] if matcher.stopped else generated
        yield GenerationOutput(kept, "".join(pieces), reason, stats)


def _created_by() -> str:
    return f"dijiang-deploy {__version__} (python)"
