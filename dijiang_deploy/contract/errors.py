"""User-facing errors.

Every error the CLI may show a user derives from :class:`DiJiangError`; its
message is one line that names the problem (file, tensor, option), so the CLI
prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class DiJiangError(Exception):
    """Base class for errors caused by the user's input or environment."""


class CheckpointError(DiJiangError):
    """A checkpoint folder is missing, corrupt, or lacks/mis-shapes a tensor."""


class UnsupportedModelError(DiJiangError):
    """The model architecture or one of its settings is not supported."""


class PositionLimitError(DiJiangError):
    """A position is past what the model's decay tables allow."""


class ExportError(DiJiangError):
    """An ONNX export folder is missing, corrupt or inconsistent."""


class BackendUnavailableError(DiJiangError):
    """A requested backend (TensorRT, CUDA, a plugin library) is not installed."""
