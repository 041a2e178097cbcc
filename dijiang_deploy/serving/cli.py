"""``dijiang-deploy serve``: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..cli_types import float_in, positive_float, positive_int
from ..contract.errors import DiJiangError

API_KEY_ENV = "DIJIANG_API_KEY"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve an export over the OpenAI API (HTTP)",
        description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, streaming, "
        "/health, /metrics, /tokenize, /detokenize, saved states). It keeps the recurrent state at the end of every "
        "request, so a conversation's next turn resumes from it and prefills only its new tokens.",
    )
    p.add_argument("export_dir", help="export folder (or engine folder with --backend trt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed when ready)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on everything but /health and /metrics "
                   f"(default: ${API_KEY_ENV} if set)")
    p.add_argument("--model-name", help="the model id clients send (default: the export folder's name)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests running at once (default 16)")
    p.add_argument("--prefill-rows", type=positive_int, default=4, help="prompts fed at once (default 4)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--step-tokens", type=positive_int, help="prompt positions fed per engine step while others decode "
                   "(default: as many as keep each decoding stream's gap within --itl-ratio decode steps)")
    p.add_argument("--itl-ratio", type=float_in(1.0, low_open=True), default=2.0, help="while prompts are fed, the decoding streams' "
                   "largest gap in decode steps (default 2; larger: faster time to first token under load)")
    p.add_argument("--max-context", type=positive_int, help="most prompt + completion tokens per request (default: no limit)")
    p.add_argument("--state-cache-mib", type=int, default=1024, help="memory for cached conversation states "
                   "(default 1024; 0 disables the cache)")
    p.add_argument("--state-dir", help="also keep cached and saved states in this folder (survives restarts)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--backend", default="ort", choices=["ort", "trt"], help="ort (export folder) or trt (engine folder)")
    p.add_argument("--provider", action="append", help="ONNX Runtime provider, e.g. CUDAExecutionProvider")
    p.add_argument("--allow-engine-host-code", action="store_true", help="--backend trt: let an engine built with "
                   "--serialize-plugins run the plugin code it carries (only for engines you trust)")
    p.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds a request may run (default 600)")
    p.add_argument("--max-body-mib", type=positive_float, default=8.0, help="largest request body (default 8 MiB)")
    p.add_argument("--grace-seconds", type=float, default=30.0, help="on SIGTERM, time running requests get (default 30)")
    ray = p.add_argument_group("Ray Serve (the 'ray' extra)")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: an ingress and engine "
                     "replicas with session affinity (starts a local Ray instance unless --ray-address)")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=1, help="engine replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale the engine replicas between MIN and MAX")
    ray.add_argument("--ray-address", help="join this Ray cluster (e.g. 10.0.0.1:6379 from 'ray start --head')")
    ray.add_argument("--replica-cpus", type=positive_float, default=1.0, help="CPUs each replica reserves (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves (with --backend trt "
                     "or --provider CUDAExecutionProvider; default 0)")
    ray.add_argument("--ray-cpus", type=positive_int, help="CPUs of the local Ray instance (default: this machine's)")
    ray.add_argument("--ray-temp-dir", help="the local Ray instance's session folder (default Ray's /tmp/ray)")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from .core import ServeOptions

    folder = Path(args.export_dir)
    if not folder.exists():
        raise DiJiangError(f"{folder}: no such file or directory")
    return ServeOptions(
        export_dir=folder, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name, max_batch=args.max_batch, prefill_rows=args.prefill_rows, max_queue=args.max_queue,
        max_context=args.max_context, step_tokens=args.step_tokens, itl_ratio=args.itl_ratio,
        state_cache_mib=args.state_cache_mib,
        state_dir=Path(args.state_dir) if args.state_dir else None, threads=args.threads, backend=args.backend,
        providers=args.provider, request_timeout=args.request_timeout, max_body_bytes=int(args.max_body_mib * 2**20),
        grace_seconds=args.grace_seconds, allow_engine_host_code=args.allow_engine_host_code,
    )


def run(args: argparse.Namespace) -> int:
    if args.ray:
        from ..contract.extras import require

        require("ray", "dijiang-deploy serve --ray")
        from .ray_app import run_ray

        return run_ray(args)
    return serve(options_from_args(args))


def serve(options) -> int:
    """Run the server until SIGINT/SIGTERM; 0 after a clean shutdown, 2 if the model cannot load."""
    import uvicorn

    from .app import create_app
    from .core import ServerCore

    core = ServerCore(options)
    config = uvicorn.Config(create_app(core), host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=int(options.grace_seconds) or None, lifespan="on")
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.should_exit and not (server.started and (core.ready or core.error)):
            time.sleep(0.02)
        if core.error:
            print(f"dijiang-deploy serve: error: {core.error}", file=sys.stderr, flush=True)
            server.should_exit = True
        elif server.started:
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else options.port
            print(f"dijiang-deploy serve: ready on http://{options.host}:{port} (model {core.model_name}, "
                  f"{core.model.manifest.weights}, batch {options.max_batch}, state cache {options.state_cache_mib} MiB"
                  f"{', ' + str(options.state_dir) if options.state_dir else ''})", flush=True)

    threading.Thread(target=announce, name="dijiang-announce", daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal to the
    # handler it found; a no-op one makes a graceful SIGTERM an exit status of 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 2 if core.error else 0
