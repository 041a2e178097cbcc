"""How to feed n tokens in the chunk lengths a lane has.

A step costs a fixed overhead (reading every weight once, launching the
graph) plus work per token, and padding a chunk costs the work of the
padded tokens. :func:`plan_chunks` minimises that: with power-of-two lengths
up to 64, 100 tokens go as chunks of 64, 4 and 32 (in that order) and 63 as one padded 64.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

#: A step's fixed cost in tokens' worth of work (a prefill token on CPU costs
#: about 1/10 of a decode step; weights are read once per step either way).
STEP_OVERHEAD_TOKENS = 8


def plan_chunks(n: int, lengths: Sequence[int], overhead: int = STEP_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Chunks ``(length, real tokens)`` covering ``n`` tokens in order.

    A chunk with fewer real tokens than its length is left-padded (the state
    ignores padding). Lengths are taken from ``lengths``; the largest is used
    while at least that many tokens remain.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lengths = tuple(sorted(set(lengths)))
    biggest = lengths[-1]
    out: list[tuple[int, int]] = []
    while n >= biggest:
        out.append((biggest, biggest))
        n -= biggest
    if n:
        out.extend(_tail(n, lengths, overhead))
    return out


@lru_cache(maxsize=4096)
def _tail(n: int, lengths: tuple[int, ...], overhead: int) -> tuple[tuple[int, int], ...]:
    """Cheapest cover of ``n`` (< max length) tokens: dynamic programming over the remainder."""
    best: list[tuple[float, tuple[tuple[int, int], ...]]] = [(0.0, ())]
    for r in range(1, n + 1):
        options = []
        for length in lengths:
            take = min(length, r)
            cost, plan = best[r - take]
            options.append((cost + overhead + length, ((length, take),) + plan))
        best.append(min(options, key=lambda x: x[0]))
    return best[n][1]
