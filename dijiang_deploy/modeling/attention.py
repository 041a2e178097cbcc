"""DiJiang attention layer (spec section 2), for both model families.

The parameter names match the authors' checkpoints (``proj_matrix``, ``W_G``,
``group_norm``, ``D1``, ``D2``) so state dicts load as they are.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import recurrence
from .decay import DecayAnalysis, analyse_tables
from .layers import apply_rotary

#: A recurrence implementation: (q, k, v, g | None, state, chunk_size) -> (o, state).
#: The exporter swaps in one that emits the ONNX node.
Recurrence = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _form(mode: str) -> Recurrence:
    if mode == "chunked":
        return recurrence.chunked
    if mode in ("parallel", "recurrent"):
        fn = recurrence.FORMS[mode]
        return lambda q, k, v, g, s, chunk_size: fn(q, k, v, g, s)
    raise ValueError(f"mode must be 'parallel', 'chunked' or 'recurrent', got {mode!r}")


class DiJiangAttention(nn.Module):
    """Frequency-domain kernelized attention with per-head decay.

    Subclasses provide :meth:`project` (the family's q/k/v projections and
    rotary embedding) and name the output projection ``dense``/``o_proj``.
    """

    log_gamma: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.num_heads, config.head_dim
        big_d = h * d
        self.num_heads, self.head_dim = h, d
        self.rtol = config.dijiang.geometric_rtol
        self.proj_matrix = nn.Parameter(torch.empty(d, d))
        self.W_G = nn.Parameter(torch.empty(big_d, big_d))
        self.group_norm = nn.GroupNorm(d, big_d, eps=config.dijiang.group_norm_eps)
        length = config.dijiang.table_length
        self.D1 = nn.Parameter(torch.ones(1, h, length, 1), requires_grad=False)
        self.D2 = nn.Parameter(torch.ones(1, h, length, 1), requires_grad=False)
        self.register_buffer("log_gamma", torch.zeros(h), persistent=False)
        self.decay: DecayAnalysis | None = None

    # -- decay --------------------------------------------------------------

    def refresh_decay(self) -> DecayAnalysis:
        """Fit gamma to D1/D2 and pick the stable or the general form.

        Call after loading weights; the tables are read once here, never on
        the hot path.
        """
        self.decay = analyse_tables(self.D1, self.D2, self.rtol)
        self.log_gamma = self.decay.log_gamma.to(device=self.D1.device, dtype=torch.float32)
        return self.decay

    @property
    def geometric(self) -> bool:
        if self.decay is None:
            raise RuntimeError("refresh_decay() was not called after loading the decay tables")
        return self.decay.geometric

    @property
    def table_length(self) -> int:
        return self.D1.shape[2]

    def decay_inputs(
        self, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Per-token ``(g, k_scale, o_scale)`` each ``[B, H, N]`` float32 or None.

        Geometric: ``g = log(gamma_h)`` on real tokens, 0 on padding.
        General: no ``g``; ``k`` scaled by ``D2[pos]``, output by ``D1[pos]``.
        """
        b, n = positions.shape
        m = None if mask is None else mask.to(torch.float32)[:, None, :]
        if self.geometric:
            g = self.log_gamma.to(positions.device)[None, :, None].expand(b, self.num_heads, n)
            return (g if m is None else g * m), m, None
        idx = positions.clamp(0, self.table_length - 1)
        d1 = self.D1[0, :, :, 0].float()[:, idx].permute(1, 0, 2)
        d2 = self.D2[0, :, :, 0].float()[:, idx].permute(1, 0, 2)
        return None, (d2 if m is None else d2 * m), d1

    # -- forward ------------------------------------------------------------

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, D]`` -> ``q, k, v`` each ``[B, H, N, d]`` after rotary."""
        raise NotImplementedError

    def output_projection(self, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """phi(y) = softmax(y @ P) over the feature axis, in float32."""
        return torch.softmax(x.float() @ self.proj_matrix.float(), dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        state: torch.Tensor,
        mode: str = "parallel",
        chunk_size: int = 64,
        core: Recurrence | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention block.

        Args:
            x: ``[B, N, D]`` block input (after the layer's input norm).
            cos, sin: rotary tables from :class:`RotaryEmbedding`.
            positions: ``[B, N]`` int64 absolute positions.
            mask: ``[B, N]`` 1 for real tokens, 0 for padding, or None.
            state: ``[B, H, d, d]`` float32 incoming state.
            mode: ``parallel``, ``chunked`` or ``recurrent``.
            core: overrides ``mode`` with another recurrence (export).

        Returns:
            ``(y [B, N, D] in x.dtype, new_state [B, H, d, d] float32)``.
        """
        o, new_state = self.mix(x, cos, sin, positions, mask, state, mode, chunk_size, core)
        b, n, _ = o.shape
        gn = self.group_norm
        o = F.group_norm(o.reshape(b * n, -1), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)
        return self.output_projection(self.gate(x) * o.reshape(b, n, -1).to(x.dtype)), new_state

    def mix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor | None, state: torch.Tensor, mode: str = "parallel", chunk_size: int = 64,
            core: Recurrence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decayed linear attention before GroupNorm and the gate (arguments
        as :meth:`forward`): ``(o [B, N, D] float32, heads merged; new_state)``."""
        q, k, v = self.project(x, cos, sin)
        g, k_scale, o_scale = self.decay_inputs(positions, mask)
        phi_q = self.feature_map(q)
        phi_k = self.feature_map(k)
        if k_scale is not None:
            phi_k = phi_k * k_scale[..., None]
        fn = core if core is not None else _form(mode)
        o, new_state = fn(phi_q, phi_k, v.float(), g, state, chunk_size)
        if o_scale is not None:
            o = o * o_scale[..., None]
        b, _, n, _ = o.shape
        return o.transpose(1, 2).reshape(b, n, -1), new_state

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x @ W_G)`` for ``x [B, N, D]``, in ``x.dtype``."""
        return F.silu(x @ self.W_G.to(x.dtype))


class NeoXAttention(DiJiangAttention):
    """GPT-NeoX: fused ``query_key_value`` laid out ``[H, 3, d]``, partial rotary."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        big_d = config.hidden_size
        self.query_key_value = nn.Linear(big_d, 3 * big_d, bias=config.attention_bias)
        self.dense = nn.Linear(big_d, big_d, bias=config.attention_bias)

    def project(self, x, cos, sin):
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output_projection(self, o):
        return self.dense(o)


class LlamaAttention(DiJiangAttention):
    """LLaMA: separate projections, full rotary, GQA expanded to one state per query head."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        big_d, kv = config.hidden_size, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.num_kv_heads = config.num_kv_heads
        self.q_proj = nn.Linear(big_d, big_d, bias=bias)
        self.k_proj = nn.Linear(big_d, kv, bias=bias)
        self.v_proj = nn.Linear(big_d, kv, bias=bias)
        self.o_proj = nn.Linear(big_d, big_d, bias=bias)

    def project(self, x, cos, sin):
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.num_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output_projection(self, o):
        return self.o_proj(o)
