"""Decay tables: building them, and deciding whether they are geometric.

The authors store two trainable tables per layer, ``D1[1, H, T, 1]`` and
``D2[1, H, T, 1]``, with ``D1[t] * D2[m] = gamma^(t - m)`` at initialisation.
When a checkpoint's tables still have that form we run the stable decayed
recurrence (no ``gamma^(-m)`` terms, no position limit); otherwise we run the
general form and refuse positions past the table (spec section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import DiJiangSettings, decay_rates


@dataclass(frozen=True)
class DecayAnalysis:
    """Result of fitting ``gamma`` to one layer's tables.

    Attributes:
        geometric: True when every head matches ``gamma_h^(t - m)``.
        log_gamma: ``[H]`` float64, the fitted ``log(gamma_h)`` (meaningful
            for the heads in ``head_ok``).
        head_ok: per head, whether its tables are geometric.
        max_log_error: per head, the worst ``|log(D1[t] D2[m]) - (t-m) log gamma|``.
    """

    geometric: bool
    log_gamma: torch.Tensor
    head_ok: tuple[bool, ...]
    max_log_error: tuple[float, ...]


def build_tables(num_heads: int, length: int, settings: DiJiangSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(D1, D2)``, each ``[1, H, length, 1]`` float64.

    float64 because ``gamma^(-t)`` for the fastest head overflows float32
    beyond about 2800 positions; the tables are only read to fit ``gamma``.
    """
    gamma = torch.tensor(decay_rates(num_heads, settings), dtype=torch.float64)
    return geometric_tables(torch.log(gamma), length)


def geometric_tables(log_gamma: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D1, D2)`` each ``[1, H, length, 1]`` float64 for per-head ``log_gamma [H]``:
    ``D1[t] = gamma^t`` and ``D2[t] = gamma^(-t)``, formed as exponentials."""
    t = torch.arange(length, dtype=torch.float64, device=log_gamma.device)
    log_g = log_gamma.double()[:, None]
    d1 = torch.exp(t[None, :] * log_g)
    d2 = torch.exp(-t[None, :] * log_g)
    return d1[None, :, :, None], d2[None, :, :, None]


def analyse_tables(d1: torch.Tensor, d2: torch.Tensor, rtol: float = 1e-3) -> DecayAnalysis:
    """Fit ``log gamma`` per head and check ``D1[t] D2[m] == gamma^(t-m)``.

    Works in log space and float64. With residuals ``r1[t] = log D1[t] - t g``
    and ``r2[m] = log D2[m] + m g`` the product matches iff ``r1[t] + r2[m]``
    is ~0 for every pair, which reduces to extreme values of r1 and r2, so the
    full T x T check costs O(T).

    Args:
        d1, d2: tables of shape ``[1, H, T, 1]`` (any float dtype).
        rtol: relative tolerance on the product (compared in log space).
    """
    if d1.shape != d2.shape or d1.dim() != 4 or d1.shape[0] != 1 or d1.shape[-1] != 1:
        raise ValueError(f"decay tables must both be [1, H, T, 1], got {tuple(d1.shape)} and {tuple(d2.shape)}")
    info = torch.finfo(d1.dtype)
    # On the CPU whatever the tables' device: read once at load, never on the hot path.
    a = d1.detach().to(device="cpu", dtype=torch.float64)[0, :, :, 0]
    b = d2.detach().to(device="cpu", dtype=torch.float64)[0, :, :, 0]
    num_heads, length = a.shape
    t = torch.arange(length, dtype=torch.float64)
    # Rounding alone makes a product of two stored values off by ~2 eps.
    tol = math.log1p(max(rtol, 4 * info.eps))
    log_gamma = torch.zeros(num_heads, dtype=torch.float64)
    ok: list[bool] = []
    err: list[float] = []
    for h in range(num_heads):
        # Tables saved in low precision overflow (D2) or underflow (D1) far
        # out; the finite entries of full precision (normal numbers, not
        # subnormals) still determine gamma.
        va = torch.isfinite(a[h]) & (a[h] >= info.tiny)
        vb = torch.isfinite(b[h]) & (b[h] >= info.tiny)
        if va.sum() < 2 or vb.sum() < 2 or not bool(va[0]) or not bool(vb[0]):
            ok.append(False)
            err.append(math.inf)
            continue
        la, lb = torch.log(a[h][va]), torch.log(b[h][vb])
        ta, tb = t[va], t[vb]
        # Least squares on both tables together: log D1 = c1 + t g, log D2 = c2 - t g.
        slope_a = _slope(ta, la)
        slope_b = -_slope(tb, lb)
        g = 0.5 * (slope_a + slope_b)
        r1 = la - ta * g
        r2 = lb + tb * g
        # r1[t] + r2[m] spans [min r1 + min r2, max r1 + max r2] over all
        # pairs, so its largest magnitude sits at one of the two ends.
        worst = max(abs(float(r1.max() + r2.max())), abs(float(r1.min() + r2.min())))
        head_ok = worst <= tol and g < 0
        log_gamma[h] = g
        ok.append(bool(head_ok))
        err.append(worst)
    return DecayAnalysis(all(ok), log_gamma, tuple(ok), tuple(err))


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    xm, ym = x.mean(), y.mean()
    den = ((x - xm) ** 2).sum()
    return float(((x - xm) * (y - ym)).sum() / den)
