"""Cheap conversion that keeps quality: fine-tune a converted DiJiang model.

Stage 1 (attention transfer) teaches every DiJiang layer to reproduce the
softmax teacher's attention output; stage 2 distils the teacher's next-token
distribution end to end. See :func:`finetune` and :func:`evaluate`.

The names below load on first use (they need torch), so the ``finetune``
subcommand's parser is cheap to build.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FinetuneResult": ".api", "finetune": ".api",
    "DataConfig": ".config", "FinetuneConfig": ".config", "Stage1Config": ".config", "Stage2Config": ".config",
    "DataError": "..data.text", "EvalResult": ".perplexity", "evaluate": ".perplexity",
    "SoftmaxTeacher": ".teacher", "load_teacher": ".teacher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
