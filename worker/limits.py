"""Provider limits inside one process (G5).

- :class:`RateLimiter`: a token bucket of ``rate`` messages/s. Its capacity is
  one token, so sends are spaced at least ``1/rate`` apart and no window of
  any length holds more than ``rate * window + 1`` of them. A sender throttle
  halves the rate and pauses the bucket; after 30 s without one, the rate
  climbs back a quarter at a time to the configured value.
- :class:`PairGate`: never two messages in flight to one recipient, and the
  next one starts at least ``interval`` seconds after the previous one ended.

Both are driven by the run's dispatcher thread and take the time as an
argument, so tests need no sleeping.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class RateLimiter:
    rate: float
    min_rate: float = 0.5
    recover_after: float = 30.0  # seconds without a throttle before the rate climbs back
    _next: float = 0.0
    _next_send: float = 0.0
    _configured: float = 0.0
    _last_throttle: float | None = None
    _last_halving: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._configured = self.rate

    def try_acquire(self, now: float) -> bool:
        """Take a token if one is available at ``now``."""
        with self._lock:
            self._maybe_recover(now)
            if now < self._next:
                return False
            self._next = max(now, self._next) + 1.0 / self.rate
            return True

    def send_delay(self, now: float) -> float:
        """How long a granted send must still wait so that requests leave at
        least ``1/rate`` apart (grants and requests are separated by the fence
        commit, whose duration varies)."""
        with self._lock:
            at = max(now, self._next_send)
            self._next_send = at + 1.0 / self.rate
            return at - now

    def ready_at(self) -> float:
        with self._lock:
            return self._next

    def throttled(self, now: float, retry_after: float | None) -> None:
        """The provider said we send too fast: halve the rate and pause. The
        answers to requests already in flight come back together, so the rate
        is halved at most once per second (one throttle episode, one halving)."""
        with self._lock:
            if self._last_halving is None or now - self._last_halving >= 1.0:
                self.rate = max(self.min_rate, self.rate / 2)
                self._last_halving = now
            pause = retry_after if retry_after and retry_after > 0 else 1.0
            self._next = max(self._next, now + pause)
            self._last_throttle = now

    def _maybe_recover(self, now: float) -> None:
        # After a quiet period, climb back by a quarter per period, never above the setting.
        last = self._last_throttle
        if last is not None and self.rate < self._configured and now - last >= self.recover_after:
            self.rate = min(self._configured, self.rate * 1.25)
            self._last_throttle = now if self.rate < self._configured else None


@dataclass
class PairGate:
    interval: float
    _busy: set[str] = field(default_factory=set)
    _ready: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ready_at(self, recipient: str, now: float) -> float | None:
        """When ``recipient`` may get the next message: ``None`` while one is in flight."""
        with self._lock:
            if recipient in self._busy:
                return None
            return max(now, self._ready.get(recipient, now))

    def can_start(self, recipient: str, now: float) -> bool:
        ready = self.ready_at(recipient, now)
        return ready is not None and ready <= now

    def start(self, recipient: str) -> None:
        with self._lock:
            if recipient in self._busy:
                raise RuntimeError("a message to this recipient is already in flight")
            self._busy.add(recipient)

    def finish(self, recipient: str, now: float, extra_wait: float = 0.0) -> None:
        """The request ended (whatever the answer): the next one waits ``interval``
        (or ``extra_wait``, when the provider asked for more) from now."""
        with self._lock:
            self._busy.discard(recipient)
            self._ready[recipient] = max(
                self._ready.get(recipient, 0.0), now + max(self.interval, extra_wait)
            )
            if len(self._ready) > 10000:  # forget recipients whose wait is long over
                for key in [k for k, t in self._ready.items() if t < now and k not in self._busy]:
                    del self._ready[key]

    def cancel(self, recipient: str) -> None:
        """A start that did not happen (the fence lost the row): no wait added."""
        with self._lock:
            self._busy.discard(recipient)
