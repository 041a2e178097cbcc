"""Cheap conversion that keeps quality: fine-tune a converted DiJiang model.

Stage 1 (attention transfer) teaches every DiJiang layer to reproduce the
softmax teacher's attention output; stage 2 distils the teacher's next-token
distribution end to end. See :func:`finetune` and :func:`evaluate`.
"""

from .api import FinetuneResult, finetune
from .config import DataConfig, FinetuneConfig, Stage1Config, Stage2Config
from .data import DataError
from .evaluate import EvalResult, evaluate
from .teacher import SoftmaxTeacher, load_teacher

__all__ = [
    "DataConfig",
    "DataError",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "SoftmaxTeacher",
    "Stage1Config",
    "Stage2Config",
    "evaluate",
    "finetune",
    "load_teacher",
]
