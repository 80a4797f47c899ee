"""Reconnect delays: exponential with jitter, so that a fleet does not reconnect in lockstep.

After a broker restart every device sees the disconnect at the same moment. Plain
doubling would bring them all back in the same second, again and again; "equal jitter"
spreads each attempt uniformly over the upper half of its exponential step.
"""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the delay before attempt ``n``: uniform in ``[cap/2, cap]``, ``cap = min(max, min * 2^n)``."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        cap = min(self.max_s, self.min_s * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return max(self.min_s, self._rng.uniform(cap / 2, cap))

    def reset(self) -> None:
        self.attempt = 0
