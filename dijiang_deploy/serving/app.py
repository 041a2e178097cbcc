"""The HTTP side: an OpenAI-compatible FastAPI app over a :class:`~.core.ServerCore`.

Routes: ``GET /health`` (503 while loading), ``GET /metrics`` (Prometheus),
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both stream as server-sent events), ``POST /tokenize``, ``POST /detokenize``,
and saved states: ``POST /v1/states``, ``GET|PUT|DELETE /v1/states/{id}``
(``docs/serving.md``). A client's mistake is a 4xx with the OpenAI error body,
never a 500; a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .core import ServerCore
from .protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, StateRequest, TokenizeRequest,
    validation_message,
)

log = logging.getLogger(__name__)

#: Routes anyone may call without the API key.
PUBLIC = ("/health", "/metrics")


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class BodyLimit:
    """ASGI middleware: a body past ``limit`` bytes is a 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = ApiError(413, f"the request body is larger than {self.limit} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(too_big)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig()
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooBig:
            return await _error(too_big)(scope, receive, send)


class _TooBig(Exception):
    pass


def create_app(core: ServerCore, load_in_background: bool = True) -> "BodyLimit":
    """The ASGI app (the FastAPI app behind a body-size limit, as ``.fastapi``).

    The model loads at startup, in a thread, so ``/health`` answers 503 meanwhile.
    """
    # One function on purpose: the routes are closures over one ServerCore, declared together as FastAPI expects.

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if load_in_background:
            loader = asyncio.get_running_loop().run_in_executor(None, _load, core)
        else:
            _load(core)
        try:
            yield
        finally:
            if loader is not None:
                await asyncio.wait([loader], timeout=600)
            await asyncio.to_thread(core.close)

    app = FastAPI(title="dijiang-deploy", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        key = core.options.api_key
        if key and not path.startswith(PUBLIC):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if token != key:
                response = _error(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                           code="invalid_api_key"))
                _count(core, path, 401)
                return response
        response = await call_next(request)
        _count(core, path, response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return _error(ApiError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return _error(ApiError(500, f"internal error ({type(exc).__name__})", type="server_error"))

    @app.get("/health")
    async def health():
        if not core.ready:
            status = "loading" if core.error is None else f"failed: {core.error}"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok", "model": core.model_name, "replica": core.options.replica}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if core.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        core.require_ready()
        return {"object": "list", "data": [{"id": core.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dijiang-deploy"}]}

    async def generate(body, tokens: list[int], request: Request):
        gen = await core.start(body, tokens)
        headers = {"x-dijiang-replica": core.options.replica, "x-dijiang-cached-tokens": str(gen.cached)}
        if body.stream:
            return StreamingResponse(gen.sse(core.options.request_timeout), media_type="text/event-stream",
                                     headers=headers | {"Cache-Control": "no-cache"})
        waiter = asyncio.ensure_future(gen.results(core.options.request_timeout))
        while not waiter.done():
            await asyncio.wait([waiter], timeout=0.1)
            if not waiter.done() and await request.is_disconnected():
                gen.cancel()
                await asyncio.wait([waiter], timeout=5)
                return Response(status_code=499)
        waiter.result()
        return JSONResponse(gen.response(), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        core.require_ready()
        core.check_model(body.model)
        return await generate(body, core.chat_tokens(body.messages), request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        core.require_ready()
        core.check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of is not supported", param="best_of")
        return await generate(body, core.prompt_tokens(body.prompt), request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        core.require_ready()
        if body.messages is not None:
            tokens = core.chat_tokens(body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            tokens = core.prompt_tokens(body.prompt) if body.prompt else []
        else:
            raise ApiError(400, "give prompt or messages", param="prompt")
        return {"tokens": tokens, "count": len(tokens)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        core.require_ready()
        tokens = core.prompt_tokens(body.tokens) if body.tokens else []
        return {"prompt": core._tokenizer().decode(tokens, skip_special_tokens=False)}

    @app.post("/v1/states")
    async def save_state(body: StateRequest):
        core.require_ready()
        return await core.save_state(body)

    @app.get("/v1/states/{state_id}")
    async def get_state(state_id: str):
        core.require_ready()
        return Response(core.get_state(state_id), media_type="application/octet-stream")

    @app.put("/v1/states/{state_id}")
    async def put_state(state_id: str, request: Request):
        core.require_ready()
        return core.upload_state(state_id, await request.body())

    @app.delete("/v1/states/{state_id}")
    async def delete_state(state_id: str):
        core.require_ready()
        return core.delete_state(state_id)

    wrapped = BodyLimit(app, core.options.max_body_bytes)
    wrapped.fastapi = app
    return wrapped


def _load(core: ServerCore) -> None:
    try:
        core.load()
    except Exception as exc:  # reported by /health and every route
        core.error = core.error or f"{type(exc).__name__}: {exc}"
        log.error("cannot load %s: %s", core.options.export_dir, core.error)


def _count(core: ServerCore, path: str, status: int) -> None:
    if core.metrics is not None:
        route = path if path.startswith(("/v1/chat", "/v1/completions", "/v1/models", "/health", "/metrics",
                                         "/tokenize", "/detokenize")) else ("/v1/states" if path.startswith("/v1/states") else "other")
        core.metrics.requests.labels(route=route, status=str(status)).inc()
