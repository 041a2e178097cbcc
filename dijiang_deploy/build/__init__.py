"""TensorRT engines from ONNX exports: target profiles (:mod:`.targets`), the
builder (:mod:`.builder`), the equivalent ``trtexec`` command (:mod:`.trtexec`),
the engine folder's manifest (:mod:`.manifest`) and the ``build`` subcommand
(:mod:`.cli`).

Importing this package imports nothing heavy (no TensorRT, torch or onnx), so
``dijiang-deploy --help`` stays fast; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BuildOptions": "options",
    "resolve_options": "options",
    "profile_specs": "options",
    "ENGINE_FILE": "manifest",
    "ENGINE_MANIFEST": "manifest",
    "EngineManifest": "manifest",
    "ProfileSpec": "manifest",
    "ShapeRange": "manifest",
    "Target": "targets",
    "list_targets": "targets",
    "load_target": "targets",
    "format_command": "trtexec",
    "trtexec_command": "trtexec",
    "build_engine": "builder",
    "package_engine": "builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
