"""The server as a Ray Serve application: an ingress and N engine replicas with session affinity.

* :class:`Ingress` (one replica, FastAPI): the same OpenAI routes as
  ``dijiang-deploy serve``. It parses a request, derives the conversation's
  affinity key (the ``x-session-id`` header, else a hash of the conversation
  up to its first user message, else of the prompt's first 256 characters),
  and calls the engine deployment with it.
* :class:`EngineReplica` (``--replicas N`` or ``--autoscale MIN:MAX``): a
  :class:`~.core.ServerCore` each (model, engine, state cache).
* :class:`SessionAffinityRouter`: consistent hashing of the key over the
  live replicas (a ring of virtual nodes), so every turn of a conversation
  reaches the replica whose cache holds its state; when that replica is
  gone, the key moves to the next one on the ring, and only its keys move.
* With a shared ``--state-dir`` every replica writes its snapshots there and
  looks there on a miss, so a conversation survives its replica (killed,
  crashed or scaled down): the next replica resumes from the snapshot.

``serve run dijiang_deploy.serving.ray_app:build export_dir=DIR replicas=2``
or ``serve deploy`` with ``examples/ray_serve.yaml`` run the same
application on an existing cluster; ``dijiang-deploy serve DIR --ray`` starts
a local Ray instance (or joins ``--ray-address``) and deploys it.
"""

# No `from __future__ import annotations`: the ingress class travels to its replica by
# value (cloudpickle), and FastAPI must find Request in its annotations as an object.
import argparse
import bisect
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

log = logging.getLogger(__name__)

#: The header a client may set to pin its conversation (Ray Serve's own default name).
SESSION_HEADER = "x-session-id"
APP_NAME = "dijiang"


def affinity_key(body: dict[str, Any], header: str | None) -> str:
    """The conversation a request belongs to: its session header, else its first turn."""
    if header:
        return "h:" + header
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        head = []
        for m in messages:
            head.append(m if isinstance(m, dict) else str(m))
            if isinstance(m, dict) and m.get("role") == "user":
                break
        text = json.dumps(head, sort_keys=True, ensure_ascii=False)
    else:
        text = json.dumps(body.get("prompt"), ensure_ascii=False)[:256]
    return "c:" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class SessionAffinityRouter(RequestRouter):
    """Consistent hashing of ``session_key`` (a keyword argument of the call) over the replicas.

    Ranks: the key's owner on the ring first, then its successors (used only
    when the owner is at ``max_ongoing_requests``). Requests without a key
    go to the least loaded replicas as usual.
    """

    VIRTUAL_NODES = 64

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ring: list[tuple[int, str]] = []
        self._ring_ids: frozenset[str] = frozenset()

    @staticmethod
    def _point(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def _rebuild(self, ids: frozenset[str]) -> None:
        self._ring = sorted((self._point(f"{rid}#{v}"), rid) for rid in ids for v in range(self.VIRTUAL_NODES))
        self._ring_ids = ids

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = None if pending_request is None else pending_request.kwargs.get("session_key")
        if not key or not by_id:
            return [candidate_replicas]
        ids = frozenset(by_id)
        if ids != self._ring_ids:
            self._rebuild(ids)
        at = bisect.bisect(self._ring, (self._point(key), ""))
        order: list[str] = []
        for i in range(len(self._ring)):
            rid = self._ring[(at + i) % len(self._ring)][1]
            if rid not in order:
                order.append(rid)
            if len(order) == len(ids):
                break
        return [[by_id[rid]] for rid in order]


class EngineReplica:
    """One replica: model, engine and state cache (a :class:`~.core.ServerCore`)."""

    def __init__(self, options: dict[str, Any]):
        from .core import ServeOptions, ServerCore

        context = serve.get_replica_context()
        opts = ServeOptions(**{**options, "export_dir": Path(options["export_dir"]),
                               "state_dir": Path(options["state_dir"]) if options.get("state_dir") else None,
                               "replica": context.replica_id.unique_id})
        self.core = ServerCore(opts)
        self.core.load()

    async def health(self) -> dict[str, Any]:
        return {"ready": self.core.ready, "replica": self.core.options.replica}

    async def describe(self) -> dict[str, Any]:
        c = self.core
        return {"model": c.model_name, "replica": c.options.replica, "fingerprint": c.model.identity.fingerprint}

    async def complete(self, kind: str, body: dict[str, Any], session_key: str | None = None) -> dict[str, Any]:
        """A non-streaming completion: ``{"status", "body", "headers"}``."""
        from .protocol import ApiError

        try:
            gen = await self._start(kind, body)
            await gen.results(self.core.options.request_timeout)
            return {"status": 200, "body": gen.response(), "headers": self._headers(gen)}
        except ApiError as exc:
            return {"status": exc.status, "body": exc.body(), "headers": exc.headers}

    async def stream(self, kind: str, body: dict[str, Any], session_key: str | None = None) -> AsyncIterator[str]:
        """A streaming completion: first a JSON line of status and headers, then the SSE events."""
        from .protocol import ApiError

        try:
            gen = await self._start(kind, body)
        except ApiError as exc:
            yield json.dumps({"status": exc.status, "body": exc.body(), "headers": exc.headers})
            return
        yield json.dumps({"status": 200, "headers": self._headers(gen)})
        async for event in gen.sse(self.core.options.request_timeout):
            yield event

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        from .protocol import ApiError, TokenizeRequest

        try:
            req = TokenizeRequest(**body)
            tokens = (self.core.chat_tokens(req.messages, req.add_generation_prompt) if req.messages is not None
                      else self.core.prompt_tokens(req.prompt or ""))
            return {"status": 200, "body": {"tokens": tokens, "count": len(tokens)}}
        except ApiError as exc:
            return {"status": exc.status, "body": exc.body()}

    async def _start(self, kind: str, body: dict[str, Any]):
        from pydantic import ValidationError

        from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, validation_message

        core = self.core
        core.require_ready()
        try:
            req = ChatCompletionRequest(**body) if kind == "chat" else CompletionRequest(**body)
        except ValidationError as exc:
            message, param = validation_message(exc.errors())
            raise ApiError(400, message, param=param, code="invalid_request") from exc
        core.check_model(req.model)
        tokens = core.chat_tokens(req.messages) if kind == "chat" else core.prompt_tokens(req.prompt)
        return await core.start(req, tokens)

    def _headers(self, gen) -> dict[str, str]:
        return {"x-dijiang-replica": self.core.options.replica, "x-dijiang-cached-tokens": str(gen.cached)}

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.close(grace=0)


def _ingress_app():
    # One function on purpose: the ingress class and its routes must be defined together inside a function so Ray pickles them by value.
    app = FastAPI(title="dijiang-deploy (Ray Serve)", docs_url=None, redoc_url=None)

    class Ingress:
        def __init__(self, engine, api_key: str | None = None):
            self.engine = engine
            self.api_key = api_key

        def _denied(self, request: Request):
            if not self.api_key:
                return None
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if token == self.api_key:
                return None
            return JSONResponse({"error": {"message": "invalid or missing API key", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)

        async def _authorized_body(self, request: Request):
            """``(body, None)``, or ``(None, response)`` for a denied or malformed request."""
            denied = self._denied(request)
            if denied is not None:
                return None, denied
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return None, JSONResponse({"error": {"message": "the body is not a JSON object", "type":
                                           "invalid_request_error", "param": None, "code": "invalid_request"}},
                                          status_code=400)
            return body, None

        async def _generate(self, kind: str, request: Request):
            body, error = await self._authorized_body(request)
            if error is not None:
                return error
            key = affinity_key(body, request.headers.get(SESSION_HEADER))
            if body.get("stream"):
                gen = self.engine.options(stream=True).stream.remote(kind, body, session_key=key)
                first = json.loads(await gen.__anext__())
                if first["status"] != 200:
                    return JSONResponse(first["body"], status_code=first["status"], headers=first.get("headers"))

                async def events():
                    try:
                        async for event in gen:
                            yield event
                    finally:
                        gen.cancel()  # a client that went away cancels the replica's generation

                return StreamingResponse(events(), media_type="text/event-stream", headers=first["headers"])
            out = await self.engine.complete.remote(kind, body, session_key=key)
            return JSONResponse(out["body"], status_code=out["status"], headers=out.get("headers"))

        @app.get("/health")
        async def health(self):
            return await self.engine.health.remote()

        @app.get("/v1/models")
        async def models(self, request: Request):
            denied = self._denied(request)
            if denied is not None:
                return denied
            info = await self.engine.describe.remote()
            return {"object": "list", "data": [{"id": info["model"], "object": "model", "created": int(time.time()),
                                                "owned_by": "dijiang-deploy"}]}

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            return await self._generate("chat", request)

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._generate("completion", request)

        @app.post("/tokenize")
        async def tokenize(self, request: Request):
            body, error = await self._authorized_body(request)
            if error is not None:
                return error
            out = await self.engine.tokenize.remote(body)
            return JSONResponse(out["body"], status_code=out["status"])

    return app, Ingress


def build_application(options: dict[str, Any], replicas: int | None = 1, autoscale: tuple[int, int] | None = None,
                      replica_cpus: float = 1.0, replica_gpus: float = 0.0, api_key: str | None = None):
    """The bound Ray Serve application (ingress + engine deployment)."""
    app, Ingress = _ingress_app()
    router = RequestRouterConfig(request_router_class=SessionAffinityRouter, request_routing_stats_period_s=1.0)
    engine_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        "request_router_config": router,
        "max_ongoing_requests": max(4, options.get("max_batch", 16) + options.get("max_queue", 64)),
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": options.get("grace_seconds", 30.0),
    }
    if autoscale is not None:
        lo, hi = autoscale
        engine_opts["autoscaling_config"] = AutoscalingConfig(min_replicas=lo, max_replicas=hi, initial_replicas=lo,
                                                              target_ongoing_requests=max(1, options.get("max_batch", 16) // 2),
                                                              upscale_delay_s=2.0, downscale_delay_s=30.0)
    else:
        engine_opts["num_replicas"] = replicas
    engine = serve.deployment(EngineReplica, name="engine", **engine_opts).bind(options)
    ingress = serve.deployment(serve.ingress(app)(Ingress), name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0.1}).bind(engine, api_key)
    return ingress


def build(args: dict[str, str]):
    """``serve run dijiang_deploy.serving.ray_app:build export_dir=DIR [replicas=N] [state_dir=DIR] ...``."""
    options = {"export_dir": args["export_dir"]}
    for key in ("state_dir", "model_name"):
        if key in args:
            options[key] = args[key]
    for key in ("max_batch", "max_queue", "state_cache_mib", "threads", "step_tokens"):
        if key in args:
            options[key] = int(args[key])
    if "itl_ratio" in args:
        options["itl_ratio"] = float(args["itl_ratio"])
    autoscale = tuple(int(x) for x in args["autoscale"].split(":")) if "autoscale" in args else None
    return build_application(options, replicas=int(args.get("replicas", 1)), autoscale=autoscale,
                             replica_cpus=float(args.get("replica_cpus", 1)), replica_gpus=float(args.get("replica_gpus", 0)),
                             api_key=args.get("api_key") or os.environ.get("DIJIANG_API_KEY"))


def run_ray(args: argparse.Namespace) -> int:
    """``dijiang-deploy serve DIR --ray``: start or join Ray, deploy, serve until SIGTERM/SIGINT."""
    import ray

    from ..contract.errors import DiJiangError
    from .cli import options_from_args

    opts = options_from_args(args)
    autoscale = None
    if args.autoscale:
        try:
            lo, hi = (int(x) for x in args.autoscale.split(":"))
        except ValueError:
            raise DiJiangError(f"--autoscale must be MIN:MAX, got {args.autoscale!r}")
        if not 0 <= lo <= hi or hi < 1:
            raise DiJiangError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {args.autoscale}")
        autoscale = (lo, hi)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()
               if k not in ("host", "port", "api_key", "replica")}
    n = autoscale[1] if autoscale is not None else args.replicas
    if opts.threads is None:
        # Replicas share the machine: without a limit each would start one ONNX Runtime thread per core.
        options["threads"] = max(1, (os.cpu_count() or 1) // n)
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if args.ray_address:
        init["address"] = args.ray_address
    else:
        # Ray's CPUs are accounting units: enough for the replicas and the ingress.
        init["num_cpus"] = args.ray_cpus or max(os.cpu_count() or 1, int(n * args.replica_cpus + 1))
        if args.ray_temp_dir:
            init["_temp_dir"] = str(Path(args.ray_temp_dir).resolve())
    ray.init(**init)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        app = build_application(options, replicas=args.replicas, autoscale=autoscale,
                                replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus, api_key=opts.api_key)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        shown = args.replicas if autoscale is None else f"{autoscale[0]}..{autoscale[1]} (autoscaling)"
        print(f"dijiang-deploy serve: ready on http://{opts.host}:{opts.port} (Ray Serve, {shown} replicas, "
              f"state dir {opts.state_dir or 'none'})", flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_ray(argparse.Namespace()))
