"""Step-time estimates that size the prefill budget of a continuous-batching step."""

from __future__ import annotations

import numpy as np


class StepCosts:
    """Running estimates of step times: a decode step, and a prefill step of n positions (a + b n).

    Exponentially weighted (half-life of a few dozen steps), so the budget
    follows the batch size and the machine's speed as they change.
    """

    DECAY = 0.95
    #: Positions a prefill step may use before any has been timed.
    UNTIMED_BUDGET = 16

    def __init__(self) -> None:
        self.decode_seconds: float | None = None
        self._sums = np.zeros(5)  # weight, sum n, sum t, sum n^2, sum n t

    def decoded(self, seconds: float) -> None:
        d = self.decode_seconds
        self.decode_seconds = seconds if d is None else self.DECAY * d + (1 - self.DECAY) * seconds

    def prefilled(self, positions: int, seconds: float) -> None:
        n = float(positions)
        self._sums = self.DECAY * self._sums + np.array([1.0, n, seconds, n * n, n * seconds])

    def prefill_line(self) -> tuple[float, float] | None:
        """``(a, b)`` with a prefill step of n positions taking about ``a + b n`` seconds."""
        w, sn, st, snn, snt = self._sums
        if w < 1e-9:
            return None
        var = w * snn - sn * sn
        if var <= 1e-9 * max(1.0, w * snn):  # one step size seen so far: no intercept to fit
            return 0.0, st / sn
        b = (w * snt - sn * st) / var
        a = (st - b * sn) / w
        if b <= 0:
            return 0.0, st / sn
        return max(a, 0.0), b

    def budget(self, itl_ratio: float) -> int:
        """Largest n whose prefill step fits in ``(itl_ratio - 1)`` decode steps (at least 1)."""
        line = self.prefill_line()
        if line is None or self.decode_seconds is None:
            return self.UNTIMED_BUDGET
        a, b = line
        room = (itl_ratio - 1.0) * self.decode_seconds - a
        return max(1, int(room / b)) if room > 0 else 1
