"""The retry policy: how long a row waits before its next attempt.

Exponential with full jitter, stored in ``proximo_intento_at`` so it survives
restarts. A throttle does not spend an attempt and waits at least what the
provider asked for."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 30.0
    cap: float = 3600.0

    def backoff(self, attempts_spent: int, rng: random.Random | None = None) -> float:
        """Delay after the ``attempts_spent``-th failed attempt (1-based):
        uniform in [d/2, d] with d = min(cap, base * 2**(n-1))."""
        n = max(1, attempts_spent)
        ceiling: float = min(self.cap, self.base * float(2 ** min(n - 1, 30)))
        r: float = (rng or random).random()
        return ceiling / 2 + r * ceiling / 2

    def throttle_delay(self, retry_after: float | None, floor: float) -> float:
        return max(retry_after or 0.0, floor)
