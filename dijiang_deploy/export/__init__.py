"""ONNX export of DiJiang models: one step graph carrying the recurrent state."""

from .graph import MODEL_FILE, ExportOptions, export_checkpoint, export_model
from ..contract.manifest import MANIFEST_NAME, Manifest
from ..contract.names import DOMAIN, OP_TYPE
from .schema import register_schema

__all__ = [
    "DOMAIN",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "ExportOptions",
    "Manifest",
    "OP_TYPE",
    "export_checkpoint",
    "export_model",
    "register_schema",
]
