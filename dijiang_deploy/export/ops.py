"""A torch custom op standing for the recurrence while exporting.

The op computes with the PyTorch chunked form (so the traced graph runs in
eager mode too) and is translated into one ``DiJiangLinearAttention`` node;
:mod:`.flavors` then rewrites that node into the requested flavor.
"""

from __future__ import annotations

import torch

from ..modeling import recurrence
from ..contract.names import DOMAIN, DOMAIN_VERSION, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

_LIB = "dijiang"
_NAME = "linear_attention"


def _unpack(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, hd = x.shape
    return x.view(b, t, heads, hd // heads).transpose(1, 2)


@torch.library.custom_op(f"{_LIB}::{_NAME}", mutates_args=())
def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_state: torch.Tensor,
    decay: torch.Tensor | None,
    num_heads: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-layout recurrence: ``[B, T, H*d]`` in, ``([B, T, H*d], [B, H, d, d])`` out."""
    q, k, v = (_unpack(x, num_heads).float() for x in (query, key, value))
    g = None if decay is None else decay.float().transpose(1, 2)
    o, s = recurrence.chunked(q, k, v, g, past_state, chunk_size)
    b, _, t, d = o.shape
    return o.transpose(1, 2).reshape(b, t, num_heads * d).to(query.dtype), s


@linear_attention.register_fake
def _(query, key, value, past_state, decay, num_heads, chunk_size):
    return torch.empty_like(value), torch.empty_like(past_state)


def packed_core(chunk_size: int):
    """A :data:`Recurrence` for :meth:`DiJiangAttention.forward` that calls the op."""

    def core(q, k, v, g, state, _chunk):
        b, h, t, d = q.shape

        def pack(x):
            return x.transpose(1, 2).reshape(b, t, h * x.shape[-1])

        decay = None if g is None else g.transpose(1, 2)
        o, s = torch.ops.dijiang.linear_attention(pack(q), pack(k), pack(v), state, decay, h, chunk_size)
        return o.view(b, t, h, v.shape[-1]).transpose(1, 2), s

    return core


def translation_table():
    """Maps the custom op to an onnxscript function emitting our node."""
    import onnxscript

    custom = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def to_onnx(query, key, value, past_state, decay, num_heads: int, chunk_size: int):
        rule = "linear" if decay is None else "gated"
        inputs = (query, key, value, past_state) + (() if decay is None else (decay,))
        return custom.DiJiangLinearAttention(
            *inputs,
            q_num_heads=num_heads,
            kv_num_heads=num_heads,
            scale=1.0,
            update_rule=rule,
            chunk_size=chunk_size,
            plugin_version=PLUGIN_VERSION,
            plugin_namespace=PLUGIN_NAMESPACE,
            _outputs=2,
        )

    return {torch.ops.dijiang.linear_attention.default: to_onnx}


__all__ = ["OP_TYPE", "linear_attention", "packed_core", "translation_table"]
