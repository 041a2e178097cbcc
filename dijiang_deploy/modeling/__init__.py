"""PyTorch reference of DiJiang attention (parallel, chunked, recurrent forms)."""

from .attention import DiJiangAttention, LlamaAttention, NeoXAttention
from .decay import DecayAnalysis, analyse_tables, build_tables
from .model import DiJiangForCausalLM, DiJiangOutput, DiJiangState

__all__ = [
    "DecayAnalysis",
    "DiJiangAttention",
    "DiJiangForCausalLM",
    "DiJiangOutput",
    "DiJiangState",
    "LlamaAttention",
    "NeoXAttention",
    "analyse_tables",
    "build_tables",
]
