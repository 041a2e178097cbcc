"""dijiang-deploy: DiJiang linear-attention models from PyTorch to fixed-memory inference.

The data path: checkpoint -> :func:`load_model` -> ONNX export -> TensorRT
engine -> runtime :class:`~dijiang_deploy.runtime.Generator`.
"""

from .checkpoint import load_model, save_checkpoint
from .config import DiJiangSettings, ModelConfig
from .errors import DiJiangError
from .modeling import DiJiangForCausalLM, DiJiangOutput, DiJiangState

__version__ = "0.1.0"

__all__ = [
    "DiJiangError",
    "DiJiangForCausalLM",
    "DiJiangOutput",
    "DiJiangSettings",
    "DiJiangState",
    "ModelConfig",
    "__version__",
    "load_model",
    "save_checkpoint",
]
