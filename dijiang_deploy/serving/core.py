"""What the server does, apart from HTTP: requests to engine jobs, the state cache, responses.

:class:`ServerCore` owns the model, one :class:`~dijiang_deploy.runtime.Engine`
and the :class:`~.state_cache.StateCache`. Each completion request is
tokenized (chat messages through the tokenizer's template), resumed from the
longest cached state its tokens start with, submitted, streamed back, and
its final states (after the prompt, after the completion) go back into the
cache. The FastAPI app (:mod:`.app`) and the Ray Serve deployment
(:mod:`.ray_app`) both drive it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from ..contract.errors import DiJiangError
from ..contract.statefile import SequenceState, StateFileError
from ..runtime import Engine, Model, QueueFullError, Request, RequestOutput, SamplingParams
from ..runtime.requests import EngineClosedError
from .metrics import ServerMetrics
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, StateRequest
from .state_cache import StateCache

log = logging.getLogger(__name__)

#: OpenAI finish_reason for each engine finish reason.
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "position_limit": "length", "cancelled": "cancelled"}


@dataclass
class ServeOptions:
    """Settings of ``dijiang-deploy serve`` (see its ``--help``)."""

    export_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_batch: int = 16
    prefill_rows: int = 4
    max_queue: int = 64
    max_context: int | None = None
    #: Prefill token positions per engine step (None: sized by ``itl_ratio``).
    step_tokens: int | None = None
    #: While requests decode, a step that also feeds a prompt may take this
    #: many decode steps' time (the engine's default budget; see ``Engine``).
    itl_ratio: float = 2.0
    state_cache_mib: int = 1024
    state_dir: Path | None = None
    max_saved_states: int = 256
    threads: int | None = None
    backend: str = "ort"
    providers: list[str] | None = None
    request_timeout: float = 600.0
    max_body_bytes: int = 8 << 20
    grace_seconds: float = 30.0
    #: Run every step shape once before serving (steadier first tokens; seconds at start).
    warmup: bool = True
    #: --backend trt: run plugin code an engine carries (--serialize-plugins).
    allow_engine_host_code: bool = False
    #: Who served a request (the Ray deployment sets its replica's name).
    replica: str = field(default_factory=lambda: f"local-{uuid.uuid4().hex[:6]}")

    def validate(self) -> None:
        for name in ("max_batch", "prefill_rows", "max_queue", "max_saved_states", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise DiJiangError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.step_tokens is not None and self.step_tokens < 1:
            raise DiJiangError(f"--step-tokens must be >= 1, got {self.step_tokens}")
        if not self.itl_ratio > 1.0:
            raise DiJiangError(f"--itl-ratio must be > 1, got {self.itl_ratio}")
        if self.state_cache_mib < 0:
            raise DiJiangError(f"--state-cache-mib must be >= 0, got {self.state_cache_mib}")
        if self.request_timeout <= 0 or self.grace_seconds < 0:
            raise DiJiangError("--request-timeout must be > 0 and the grace period >= 0")
        if not 0 <= self.port <= 65535:
            raise DiJiangError(f"--port must be in 0..65535, got {self.port}")


class ServerCore:
    """The model, engine and state cache of one server (or one Ray replica)."""

    def __init__(self, options: ServeOptions):
        options.validate()
        self.options = options
        self.model: Model | None = None
        self.engine: Engine | None = None
        self.cache: StateCache | None = None
        self.metrics = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._saved: dict[str, SequenceState] = {}
        self._repairs: set[asyncio.Task] = set()

    # -- life cycle -------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def model_name(self) -> str:
        return self.options.model_name or Path(self.options.export_dir).resolve().name

    def load(self) -> None:
        """Open the model and start the engine (slow: run it off the event loop)."""

        o = self.options
        try:
            model = Model.open(o.export_dir, backend=o.backend, providers=o.providers, threads=o.threads,
                               allow_engine_host_code=o.allow_engine_host_code)
            if model.tokenizer is None:
                log.warning("%s has no tokenizer: only token-id prompts work", o.export_dir)
            self.model = model
            self.engine = Engine(model, max_batch=o.max_batch, prefill_rows=o.prefill_rows, max_queue=o.max_queue,
                                 max_context=o.max_context, step_tokens=o.step_tokens, itl_ratio=o.itl_ratio,
                                 warmup=o.warmup)
            self.cache = StateCache(model.identity, o.state_cache_mib << 20, o.state_dir)
            self.metrics = ServerMetrics(lambda: (self.engine.running, self.engine.waiting), lambda: self.cache.stats)
            if o.state_dir is not None:
                self._load_saved()
            self._ready.set()
        except DiJiangError as exc:
            self.error = str(exc)
            raise

    def close(self, grace: float | None = None) -> None:
        """Stop the engine (after a grace period for running requests) and flush the cache."""
        if self.engine is not None:
            grace = self.options.grace_seconds if grace is None else grace
            deadline = time.monotonic() + grace
            while self.engine.running + self.engine.waiting and time.monotonic() < deadline:
                time.sleep(0.05)
            self.engine.close(cancel=True)
        if self.cache is not None:
            self.cache.close()

    def require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "the model is still loading" if self.error is None else f"the model failed to load: {self.error}",
                           type="server_error", code="model_not_ready", headers={"Retry-After": "1"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(400, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    # -- tokens -------------------------------------------------------------------
    def _tokenizer(self):
        if self.model.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids", param="prompt", code="no_tokenizer")
        return self.model.tokenizer

    def chat_tokens(self, messages, add_generation_prompt: bool = True) -> list[int]:
        tok = self._tokenizer()
        if tok.chat_template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return tok.encode_chat(msgs, add_generation_prompt)
        except DiJiangError as exc:
            raise ApiError(400, str(exc), param="messages") from exc

    def prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt is empty", param="prompt")
            return self._tokenizer().encode(prompt)
        try:
            return self.model.check_tokens(prompt)
        except DiJiangError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc

    # -- generation ---------------------------------------------------------------
    def _sampling(self, body, index: int) -> SamplingParams:
        seed = None if body.seed is None else body.seed + index
        try:
            return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                                  repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, seed=seed)
        except DiJiangError as exc:
            raise ApiError(400, str(exc)) from exc

    def _max_new(self, body, prompt_len: int) -> int:
        limit = body.limit()
        ctx = self.options.max_context
        if ctx is not None:
            room = ctx - prompt_len
            if room < 1:
                raise ApiError(400, f"the prompt has {prompt_len} tokens; this server's context limit is {ctx}",
                               param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                               code="context_length_exceeded")
            if limit is not None and limit > room:
                raise ApiError(400, f"max_tokens {limit} plus the prompt's {prompt_len} tokens exceed the context "
                               f"limit of {ctx}", param="max_tokens", code="context_length_exceeded")
            return limit or room
        return limit or 4096

    async def _submit(self, request: Request):
        try:
            return await self.engine.asubmit(request)
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy ({exc}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from exc
        except EngineClosedError as exc:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from exc
        except DiJiangError as exc:
            raise ApiError(400, str(exc)) from exc

    async def start(self, body, tokens: list[int]) -> "Generation":
        """Submit ``body``'s choices for ``tokens``; returns the running generation."""
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if isinstance(body, CompletionRequest) and (body.echo or body.suffix):
            raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        if not tokens:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        max_new = self._max_new(body, len(tokens))
        cache = self.cache
        start = await asyncio.to_thread(cache.longest_prefix, tokens) if cache.enabled else None
        cached = start.position if start is not None else 0
        rest = tokens[cached:]
        keep = cache.enabled
        stops = body.stop_list()
        handles = []
        if body.n > 1 and rest:
            # One prefill, forked: every choice starts from the state after the prompt.
            pre = await self._submit(Request(rest, 1, self._sampling(body, 0), start=start, return_prompt_state=True))
            out = await pre.aresult()
            if out.finish_reason == "error":
                raise ApiError(500, f"generation failed: {out.error}", type="server_error")
            start, rest = out.prompt_state, []
            if keep:
                cache.put(start)
        for i in range(body.n):
            handles.append(await self._submit(Request(
                rest, max_new, self._sampling(body, i), stops, start=start, return_state=keep,
                return_prompt_state=keep and bool(rest),
            )))
        return Generation(self, body, tokens, cached, handles)

    def finished(self, gen: "Generation", index: int, out: RequestOutput) -> None:
        """Cache a finished choice's states and count it."""
        self.metrics.observe(out)
        cache = self.cache
        if not cache.enabled or out.finish_reason in ("error",):
            return
        if out.prompt_state is not None:
            cache.put(out.prompt_state)
        if out.state is None:
            return
        body = gen.body
        if isinstance(body, ChatCompletionRequest) and self.model.tokenizer is not None:
            closed = self.chat_tokens([*body.messages, _Assistant(out.text)], add_generation_prompt=False)
            fed = out.state.tokens.tolist()
            if closed[: len(fed)] != fed:
                # The answer does not re-tokenize to what was generated: the next turn's rendering
                # will not start with this state. Feed the canonical tokens from the prompt's state.
                base = out.prompt_state or cache.longest_prefix(gen.tokens)
                if base is not None and closed[: base.position] == base.tokens.tolist():
                    self._repair(base, closed[base.position :])
                return
        cache.put(out.state)

    def _repair(self, base: SequenceState, tokens: list[int]) -> None:
        async def run() -> None:
            try:
                h = await self.engine.asubmit(Request(tokens, 1, start=base, return_prompt_state=True))
                out = await h.aresult()
                if out.prompt_state is not None:
                    self.cache.put(out.prompt_state)
            except DiJiangError as exc:  # busy or closing: the cache just misses later
                log.info("state cache repair skipped: %s", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    # -- saved states (explicit sessions) --------------------------------------------
    def _saved_dir(self) -> Path | None:
        return None if self.options.state_dir is None else Path(self.options.state_dir) / "saved"

    def _load_saved(self) -> None:
        folder = self._saved_dir()
        if folder is None or not folder.exists():
            return
        for path in folder.glob("*.djstate"):
            try:
                state = SequenceState.load(path, expect=self.model.identity)
            except StateFileError as exc:
                log.warning("saved state %s skipped: %s", path.name, exc)
                continue
            self._saved[path.stem] = state
            self.cache.put(state)

    async def save_state(self, body: StateRequest, state_id: str | None = None) -> dict[str, Any]:
        self.check_model(body.model)
        if body.messages is not None:
            tokens = self.chat_tokens(body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            tokens = self.prompt_tokens(body.prompt)
        else:
            raise ApiError(400, "give messages or prompt", param="messages")
        if not tokens:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        state = self.cache.longest_prefix(tokens) if self.cache.enabled else None
        if state is None or state.position < len(tokens):
            start = state
            h = await self._submit(Request(tokens[start.position if start else 0 :], 1, start=start,
                                           return_prompt_state=True))
            out = await h.aresult()
            if out.prompt_state is None:
                raise ApiError(500, f"prefill failed: {out.error}", type="server_error")
            state = out.prompt_state
        return self._store(state_id or f"state-{uuid.uuid4().hex[:12]}", state)

    def _store(self, state_id: str, state: SequenceState) -> dict[str, Any]:
        if not _valid_id(state_id):
            raise ApiError(400, "a state id is 1-64 letters, digits, '-' or '_'", param="id")
        if state_id not in self._saved and len(self._saved) >= self.options.max_saved_states:
            raise ApiError(400, f"{len(self._saved)} states are saved (the limit); delete some first", code="too_many_states")
        self._saved[state_id] = state
        folder = self._saved_dir()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            state.save(folder / f"{state_id}.djstate")
        self.cache.put(state)
        return {"id": state_id, "object": "state", "tokens": state.position, "fingerprint": state.model.fingerprint}

    def upload_state(self, state_id: str, data: bytes) -> dict[str, Any]:
        try:
            state = SequenceState.from_bytes(data, expect=self.model.identity, source="the uploaded state")
        except StateFileError as exc:
            raise ApiError(400, str(exc), param="body", code="invalid_state") from exc
        return self._store(state_id, state)

    def get_state(self, state_id: str) -> bytes:
        state = self._saved.get(state_id)
        if state is None:
            raise ApiError(404, f"no saved state '{state_id}'", param="id", code="state_not_found")
        return state.to_bytes()

    def delete_state(self, state_id: str) -> dict[str, Any]:
        state = self._saved.pop(state_id, None)
        if state is None:
            raise ApiError(404, f"no saved state '{state_id}'", param="id", code="state_not_found")
        folder = self._saved_dir()
        if folder is not None:
            (folder / f"{state_id}.djstate").unlink(missing_ok=True)
        self.cache.remove(state.tokens)
        return {"id": state_id, "object": "state", "deleted": True}


class _Assistant:
    """The assistant message a finished chat answer adds (for re-rendering)."""

    role = "assistant"

    def __init__(self, content: str):
        self.content = content

    def text(self) -> str:
        return self.content


def _valid_id(state_id: str) -> bool:
    return 0 < len(state_id) <= 64 and all(c.isalnum() or c in "-_" for c in state_id)


class Generation:
    """The choices of one request, running in the engine."""

    def __init__(self, core: ServerCore, body, tokens: list[int], cached: int, handles):
        self.core, self.body, self.tokens, self.cached, self.handles = core, body, tokens, cached, handles
        self.id = ("chatcmpl-" if isinstance(body, ChatCompletionRequest) else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.outputs: dict[int, RequestOutput] = {}

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    async def results(self, timeout: float) -> list[RequestOutput]:
        try:
            outs = await asyncio.wait_for(asyncio.gather(*(h.aresult() for h in self.handles)), timeout)
        except asyncio.TimeoutError:
            self.cancel()
            raise ApiError(408, f"the request ran past the server's {timeout:.0f} s limit", type="timeout",
                           code="request_timeout") from None
        for i, out in enumerate(outs):
            self._finished(i, out)
        return outs

    def _finished(self, index: int, out: RequestOutput) -> None:
        self.outputs[index] = out
        if out.finish_reason == "error":
            raise ApiError(500, f"generation failed: {out.error}", type="server_error")
        self.core.finished(self, index, out)

    def usage(self) -> dict[str, Any]:
        completion = sum(o.completion_tokens for o in self.outputs.values())
        return {"prompt_tokens": len(self.tokens), "completion_tokens": completion,
                "total_tokens": len(self.tokens) + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    # -- responses ------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        chat = isinstance(self.body, ChatCompletionRequest)
        choices = []
        for i in sorted(self.outputs):
            out = self.outputs[i]
            reason = FINISH.get(out.finish_reason, out.finish_reason)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": out.text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if chat else "text_completion", "created": self.created,
                "model": self.core.model_name, "choices": choices, "usage": self.usage(),
                "system_fingerprint": self.core.model.identity.fingerprint[:16]}

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        chat = isinstance(self.body, ChatCompletionRequest)
        data = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": self.created,
                "model": self.core.model_name, "choices": choices,
                "system_fingerprint": self.core.model.identity.fingerprint[:16]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def sse(self, timeout: float) -> AsyncIterator[str]:
        """Server-sent events as the OpenAI API streams them; cancels the choices if abandoned."""
        chat = isinstance(self.body, ChatCompletionRequest)
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle) -> None:
            try:
                async for ev in handle.stream():
                    await merged.put((i, ev))
                await merged.put((i, handle.output))
            except Exception as exc:  # noqa: BLE001 - surfaced as an error event below
                await merged.put((i, exc))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        deadline = time.monotonic() + timeout
        done = 0
        try:
            if chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.handles))])
            while done < len(self.handles):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(408, f"the request ran past the server's {timeout:.0f} s limit", type="timeout",
                                   code="request_timeout")
                try:
                    i, item = await asyncio.wait_for(merged.get(), left)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, RequestOutput):
                    done += 1
                    self._finished(i, item)
                    reason = FINISH.get(item.finish_reason, item.finish_reason)
                    if chat:
                        yield self._chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
                    else:
                        yield self._chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": reason}])
                    continue
                if not item.text:
                    continue
                if chat:
                    yield self._chunk([{"index": i, "delta": {"content": item.text}, "logprobs": None, "finish_reason": None}])
                else:
                    yield self._chunk([{"index": i, "text": item.text, "logprobs": None, "finish_reason": None}])
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            self.cancel()
            yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away (the response task is cancelled) frees its slots at once.
            self.cancel()
            for t in tasks:
                t.cancel()
