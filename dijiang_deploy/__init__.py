"""dijiang-deploy: DiJiang linear-attention models from PyTorch to fixed-memory inference.

The data path: checkpoint -> :func:`load_model` -> ONNX export -> TensorRT
engine -> runtime :class:`~dijiang_deploy.runtime.Generator`.

The PyTorch names below load on first use, so ``import dijiang_deploy.runtime``
works with the core install (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .contract.errors import DiJiangError

#: Public names of the modeling layer and where they live (imported lazily: torch).
_LAZY = {
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "DiJiangSettings": "config",
    "ModelConfig": "config",
    "DiJiangForCausalLM": "modeling",
    "DiJiangOutput": "modeling",
    "DiJiangState": "modeling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DiJiangError", "__version__", *_LAZY]
