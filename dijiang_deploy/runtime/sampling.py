"""Token selection from one row of logits (numpy, host side)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingOptions:
    """Greedy when ``temperature == 0`` (the default).

    ``repetition_penalty`` follows the CTRL/Hugging Face rule: a seen token's
    positive logit is divided by it, a negative one multiplied.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, options: SamplingOptions):
        options.validate()
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """Pick a token from ``logits [V]``; ``seen`` holds ids for the repetition penalty."""
        o = self.options
        x = logits.astype(np.float32, copy=True)
        if o.repetition_penalty != 1.0 and seen is not None and seen.size:
            ids = np.unique(seen)
            vals = x[ids]
            x[ids] = np.where(vals > 0, vals / o.repetition_penalty, vals * o.repetition_penalty)
        if o.temperature == 0:
            return int(np.argmax(x))
        x = x / o.temperature
        if o.top_k and o.top_k < x.size:
            kth = np.partition(x, -o.top_k)[-o.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if o.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < o.top_p  # always keeps the top token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
