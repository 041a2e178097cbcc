"""Building blocks shared by both families: rotary embedding, MLPs, norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..contract.errors import UnsupportedModelError

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported hidden_act {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding on the first ``rotary_ndims`` channels.

    The inverse frequencies come from the model's own rope settings; scaled
    variants (linear, llama3, yarn, longrope) are computed by transformers'
    maintained rope functions rather than re-derived here.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary_ndims = config.rotary_ndims
        # Computed on the CPU even inside a meta-device context (checkpoint
        # loading builds the module skeleton on "meta"): transformers' rope
        # functions copy their results, which a meta tensor cannot give.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = self._init(config)
        # float32 whatever the model dtype: positions times fp16 frequencies
        # lose whole radians past a few thousand tokens.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    @staticmethod
    def _init(config: ModelConfig) -> tuple[torch.Tensor, float]:
        rd = config.rotary_ndims
        if config.rope_type == "default":
            exponent = torch.arange(0, rd, 2, dtype=torch.int64).to(torch.float64) / rd
            return 1.0 / (config.rope_theta**exponent), 1.0
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = LlamaConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            rope_parameters=dict(config.rope_parameters),
        )
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[config.rope_type](hf, torch.device("cpu"))
        if inv_freq.numel() * 2 != rd:
            raise UnsupportedModelError(f"rope settings give {inv_freq.numel() * 2} rotary dims, expected {rd}")
        return inv_freq.to(torch.float64), float(scaling)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [B, N]`` int64 -> ``(cos, sin)`` each ``[B, 1, N, rotary_ndims]`` float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x [B, H, N, d]``."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class NeoXMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

