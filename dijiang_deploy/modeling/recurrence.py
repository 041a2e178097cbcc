"""The three equivalent forms of DiJiang's decayed linear attention.

All functions work per head on float32 tensors that already went through the
feature map, and share one contract, that of ONNX ``LinearAttention`` with
``scale = 1``:

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        (g is None: no decay)
    o_t = q_t^T S_t

Shapes: ``q, k`` ``[B, H, N, dk]``, ``v`` ``[B, H, N, dv]``, ``g`` ``[B, H, N]``
(log decay per token, <= 0), ``state`` ``[B, H, dk, dv]``. Each returns
``(o [B, H, N, dv], new_state [B, H, dk, dv])``.

Geometric DiJiang decay is ``g_t = log(gamma_h)`` for real tokens and 0 for
padding (whose ``k`` is zeroed by the caller), so padding leaves the state as
it was. The general D1/D2 form is ``g = None`` with ``k`` pre-scaled by
``D2[t]`` and ``o`` post-scaled by ``D1[t]`` by the caller.
"""

from __future__ import annotations

import torch


def parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic reference: ``O = (Q K^T * Gamma) V`` plus the incoming state.

    ``Gamma[t, m] = exp(c_t - c_m)`` for ``m <= t`` with ``c = cumsum(g)``,
    accumulated in float64 so that the exponent equals ``(t - m) log gamma``
    to double precision; entries above the diagonal are masked before the
    exponential so no positive exponent is ever evaluated.
    """
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if g is None:
        decay = causal.to(q.dtype).expand(q.shape[0], q.shape[1], n, n)
        to_start = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
        total = torch.ones(q.shape[:2], dtype=q.dtype, device=q.device)
        from_m = to_start
    else:
        c = torch.cumsum(g.to(torch.float64), dim=-1)
        diff = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf"))
        decay = torch.exp(diff).to(q.dtype)
        to_start = torch.exp(c).to(q.dtype)
        total = torch.exp(c[..., -1]).to(q.dtype)
        from_m = torch.exp(c[..., -1:] - c).to(q.dtype)
    scores = (q @ k.transpose(-1, -2)) * decay
    out = scores @ v + to_start[..., None] * (q @ state)
    new_state = total[..., None, None] * state + (k * from_m[..., None]).transpose(-1, -2) @ v
    return out, new_state


def chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-time form: quadratic only inside chunks of ``chunk_size`` tokens.

    For a chunk with local cumulative decay ``c`` (float32, as a kernel would):
    ``o_t = exp(c_t) q_t S_0 + sum_{m<=t} exp(c_t - c_m) (q_t . k_m) v_m`` and
    ``S_L = exp(c_L) S_0 + sum_m exp(c_L - c_m) k_m v_m^T``. Every exponent is
    a sum of ``g <= 0`` terms, so nothing can overflow.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    outs = []
    n = q.shape[2]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        length = end - start
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if g is None:
            intra = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
            outs.append(intra @ vc + qc @ state)
            state = state + kc.transpose(-1, -2) @ vc
            continue
        c = torch.cumsum(g[:, :, start:end], dim=-1)
        diff = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf"))
        intra = (qc @ kc.transpose(-1, -2)) * torch.exp(diff)
        outs.append(intra @ vc + torch.exp(c)[..., None] * (qc @ state))
        k_to_end = kc * torch.exp(c[..., -1:] - c)[..., None]
        state = torch.exp(c[..., -1])[..., None, None] * state + k_to_end.transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2), state


def recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token decode form: fixed memory, one ``[dk, dv]`` state per head."""
    outs = []
    for t in range(q.shape[2]):
        update = k[:, :, t, :, None] * v[:, :, t, None, :]
        if g is None:
            state = state + update
        else:
            state = torch.exp(g[:, :, t])[..., None, None] * state + update
        outs.append((q[:, :, t, None, :] @ state)[:, :, 0])
    return torch.stack(outs, dim=2), state


FORMS = {"parallel": parallel, "chunked": chunked, "recurrent": recurrent}
