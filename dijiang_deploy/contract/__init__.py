"""The bottom layer: what an export folder, a state file and every layer agree on.

Imports neither torch nor onnx, so the runtime (and anything that only reads
export folders) works with the core install. Layers above it, in order:
modeling (checkpoint, conversion), quantization, export, build, runtime,
serving; verify, bench and finetune sit on top.
"""

from .errors import BackendUnavailableError, CheckpointError, DiJiangError, ExportError, PositionLimitError
from .manifest import FORMAT, Manifest, TensorSpec
from .names import MANIFEST_NAME, MODEL_FILE
from .statefile import ModelIdentity, SequenceState, StateFileError

__all__ = [
    "BackendUnavailableError", "CheckpointError", "DiJiangError", "ExportError", "FORMAT", "MANIFEST_NAME", "MODEL_FILE",
    "Manifest", "ModelIdentity", "PositionLimitError", "SequenceState", "StateFileError", "TensorSpec",
]
