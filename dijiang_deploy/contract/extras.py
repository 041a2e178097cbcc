"""Optional parts of the install, and the one-line error when one is missing.

The core install is the runtime (numpy, onnxruntime, tokenizers, jinja2):
open an export folder, tokenize, generate, save states. Everything that
touches PyTorch models or ONNX graphs comes with an extra (pyproject.toml).
"""

from __future__ import annotations

import importlib.util

from .errors import DiJiangError

#: Extra -> the modules it provides (import names), as pyproject.toml declares them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "scipy", "safetensors", "tqdm"),
    "gguf": ("gguf",),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "ray": ("ray", "fastapi", "uvicorn", "prometheus_client"),
    "bench": ("matplotlib", "psutil"),
}


class MissingExtraError(DiJiangError):
    """A command needs an optional part of the install that is not there."""


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install unless all its modules import."""
    gone = missing(extra)
    if gone:
        raise MissingExtraError(
            f"{what} needs the '{extra}' extra (missing: {', '.join(gone)}): pip install 'dijiang-deploy[{extra}]'"
        )
