"""A numpy implementation of the ``DiJiangLinearAttention`` node.

Used to run ``plugin``-flavor graphs on ONNX Runtime (through
onnxruntime-extensions' Python custom ops) and as an independent reference in
tests. Semantics: plugins/README.md.
"""

from __future__ import annotations

import numpy as np


def linear_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    past_state: np.ndarray,
    decay: np.ndarray | None,
    num_heads: int,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Token-by-token recurrence in float32 (float64 accumulation is not needed:
    the state is a decayed sum of bounded terms).

    Shapes: ``query/key [B, T, H*dk]``, ``value [B, T, H*dv]``, ``past_state
    [B, H, dk, dv]``, ``decay [B, T, H]`` or None. Returns ``(output [B, T, H*dv],
    present_state [B, H, dk, dv])``.
    """
    b, t, _ = query.shape
    q = query.reshape(b, t, num_heads, -1).astype(np.float32)
    k = key.reshape(b, t, num_heads, -1).astype(np.float32)
    v = value.reshape(b, t, num_heads, -1).astype(np.float32)
    s = past_state.astype(np.float32, copy=True)
    out = np.empty((b, t, num_heads, v.shape[-1]), np.float32)
    for i in range(t):
        if decay is not None:
            s *= np.exp(decay[:, i].astype(np.float32))[:, :, None, None]
        s += k[:, i, :, :, None] * v[:, i, :, None, :]
        out[:, i] = np.einsum("bhi,bhij->bhj", q[:, i], s)
    return (scale * out).reshape(b, t, -1).astype(query.dtype), s


_REGISTERED: set[str] = set()


def register_python_custom_op(gated: bool) -> str:
    """Register the op with onnxruntime-extensions; returns the domain to use.

    Raises:
        ImportError: onnxruntime-extensions is not installed.
    """
    from onnxruntime_extensions import PyCustomOpDef, onnx_op
    from onnxruntime_extensions._ocos import default_opset_domain

    key = "gated" if gated else "linear"
    if key not in _REGISTERED:
        n_in = 5 if gated else 4
        attrs = {
            "q_num_heads": PyCustomOpDef.dt_int64,
            "scale": PyCustomOpDef.dt_float,
        }

        def body(*args, q_num_heads, scale):
            q, k, v, s = args[:4]
            d = args[4] if gated else None
            return linear_attention(q, k, v, s, d, q_num_heads, scale)

        onnx_op(
            op_type=f"DiJiangLinearAttention{'Gated' if gated else 'Linear'}",
            inputs=[PyCustomOpDef.dt_float] * n_in,
            outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
            attrs=attrs,
        )(body)
        _REGISTERED.add(key)
    return default_opset_domain()
