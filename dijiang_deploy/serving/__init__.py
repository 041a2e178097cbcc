"""Serving: an OpenAI-compatible HTTP server whose conversations cost only their new tokens.

:mod:`.core` (engine, state cache, responses), :mod:`.app` (FastAPI),
:mod:`.state_cache`, :mod:`.metrics`, :mod:`.cli` (``dijiang-deploy serve``).
Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client).
"""
