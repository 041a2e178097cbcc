"""Low-rank adapters on the attention (and optionally MLP) projections, merged back before saving.

While training, ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (LLaMA) or
``query_key_value``/``dense`` (GPT-NeoX), and with stage 2's ``adapters``
mode the MLP projections, are wrapped in :class:`LoRALinear`;
:func:`merge_adapters` folds ``W += scale * B @ A`` into the frozen weight and
puts the plain :class:`torch.nn.Linear` back, so the saved checkpoint has the
same tensor names and shapes as a converted one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..modeling.attention import DiJiangAttention

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "dense")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h")


class LoRALinear(nn.Module):
    """``y = base(x) + scale * (x @ A^T) @ B^T``.

    Attributes:
        base: the wrapped linear layer, frozen.
        lora_A: ``[r, in]`` float32, Kaiming-uniform initialised.
        lora_B: ``[out, r]`` float32, zeros (the adapter starts as a no-op).
        scale: ``alpha / r``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter((torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight (in place)."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


def add_adapters(
    module: DiJiangAttention | nn.Module, rank: int, names: tuple[str, ...] = ATTENTION_PROJECTIONS, seed: int = 0
) -> list[nn.Parameter]:
    """Wrap ``module``'s projections named in ``names``; returns the new parameters."""
    params: list[nn.Parameter] = []
    for i, name in enumerate(names):
        lin = getattr(module, name, None)
        if isinstance(lin, nn.Linear):
            wrapped = LoRALinear(lin, rank, seed=seed * 7919 + i)
            setattr(module, name, wrapped)
            params += [wrapped.lora_A, wrapped.lora_B]
        elif isinstance(lin, LoRALinear):
            params += [lin.lora_A, lin.lora_B]
    return params


def merge_adapters(module: nn.Module) -> int:
    """Fold every :class:`LoRALinear` under ``module`` back into a plain linear.

    Returns:
        the number of adapters merged.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                count += 1
    return count
