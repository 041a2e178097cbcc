"""Token selection from one row of logits, with per-request state that does not grow.

Per token the work is O(V) at most and independent of the context length:
penalties read running counts (updated by one increment per token), top-k
and top-p select by partition before sorting a small candidate set, and the
random draw comes from a per-request SplitMix64 generator whose state is
one integer (saved in state files; the C runtime implements the same one),
so seeded sampling does not depend on what else shares a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from ..contract.errors import DiJiangError

_MASK64 = (1 << 64) - 1


class SplitMix64:
    """Steele, Lea and Flood's SplitMix64: a 64-bit state, one draw per token."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        """A double in [0, 1) from the top 53 bits."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def to_record(self) -> dict[str, Any]:
        return {"rng": "splitmix64", "state": self.state}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "SplitMix64":
        if not isinstance(record, dict) or record.get("rng") != "splitmix64" or not isinstance(record.get("state"), int):
            raise DiJiangError(f"unknown sampler state {record!r:.80}")
        rng = cls(0)
        rng.state = record["state"] & _MASK64
        return rng


def fresh_seed() -> int:
    return int.from_bytes(np.random.default_rng().bytes(8), "little")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Greedy when ``temperature == 0`` (the default).

    Attributes:
        temperature: >= 0; logits are divided by it.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens with this much probability, in (0, 1].
        min_p: drop tokens less likely than ``min_p`` times the most likely, in [0, 1).
        repetition_penalty: > 0; the CTRL / Hugging Face rule over the prompt
            and the generated tokens (a seen token's positive logit divided
            by it, a negative one multiplied).
        presence_penalty, frequency_penalty: in [-2, 2], the OpenAI rules over
            the generated tokens (minus ``presence`` once per seen token,
            minus ``frequency`` per occurrence).
        seed: seed of the request's own generator; None draws one.

    Raises:
        DiJiangError: a value out of range (the message names the field).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> DiJiangError:
            return DiJiangError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("top_k", "seed"):
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                    raise bad(f.name, "an integer")
            elif isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise bad(f.name, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if self.top_k < 0:
            raise bad("top_k", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise bad("min_p", "in [0, 1)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class TokenSampler:
    """One request's sampler: its parameters, RNG and running token counts.

    Args:
        params: the sampling parameters.
        vocab_size: V, the logits' width.
        prompt: token ids already in the context (the repetition penalty sees them).
        rng: a generator to continue (a resumed session); default: seeded from ``params``.
    """

    #: Candidates sorted first for top-p; widened (doubled) only when they
    #: hold less than top_p of the probability.
    TOP_P_CANDIDATES = 64

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: Sequence[int] = (), rng: SplitMix64 | None = None):
        self.params = params
        self.vocab_size = vocab_size
        self.rng = rng or SplitMix64(params.seed if params.seed is not None else fresh_seed())
        self._seen: np.ndarray | None = None
        self._generated: np.ndarray | None = None
        if params.penalised:
            self._seen = np.zeros(vocab_size, np.int32)
            self._generated = np.zeros(vocab_size, np.int32)
            ids = np.asarray(prompt, np.int64)
            if ids.size:
                self._seen += np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size).astype(np.int32)

    def observe(self, token: int) -> None:
        """Count a generated token (for the penalties)."""
        if self._seen is not None and 0 <= token < self.vocab_size:
            self._seen[token] += 1
            self._generated[token] += 1

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """``logits [V]`` after penalties (float32 copy, or the input if none apply)."""
        p = self.params
        if self._seen is None:
            return logits
        x = logits.astype(np.float32, copy=True)
        if p.repetition_penalty != 1.0:
            seen = self._seen > 0
            x = np.where(seen, np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        if p.frequency_penalty:
            x -= p.frequency_penalty * self._generated
        if p.presence_penalty:
            x -= p.presence_penalty * (self._generated > 0)
        return x

    def __call__(self, logits: np.ndarray) -> int:
        """Pick the next token from ``logits [V]`` (float32 or float16)."""
        p = self.params
        x = self.adjusted(logits)
        if p.greedy:
            return int(np.argmax(x))
        return self._sample(np.asarray(x, np.float64) / p.temperature)

    def _sample(self, x: np.ndarray) -> int:
        """Draw from ``softmax(x)`` restricted by top-k, then top-p, then min-p (Hugging Face's order)."""
        p = self.params
        v = x.size
        if 0 < p.top_k < v:
            kth = np.partition(x, v - p.top_k)[v - p.top_k]
            x = np.where(x >= kth, x, -np.inf)
        weights = np.exp(x - x.max())
        if p.top_p < 1.0:
            total = weights.sum()
            alive = int(np.count_nonzero(weights))
            n = min(alive, self.TOP_P_CANDIDATES)
            while True:
                cand = np.argpartition(-x, n - 1)[:n] if n < v else np.arange(v)
                cand = cand[np.argsort(-x[cand], kind="stable")]
                cum = np.cumsum(weights[cand]) / total
                if cum[-1] >= p.top_p or n >= alive:
                    break
                n = min(alive, 2 * n)
            cand = cand[: int(np.searchsorted(cum, p.top_p, side="left")) + 1]
            w = weights[cand]
        else:
            cand = np.flatnonzero(weights)
            w = weights[cand]
        if p.min_p > 0:
            keep = w >= p.min_p * w.max()
            cand, w = cand[keep], w[keep]
        cum = np.cumsum(w)
        i = int(np.searchsorted(cum, self.rng.uniform() * cum[-1], side="right"))
        return int(cand[min(i, len(cand) - 1)])
