"""Per-device token buckets: a device may send ``burst`` updates at once, then ``rate`` a minute."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """``allow(device)`` takes a token from the device's bucket; disabled when ``per_minute`` is 0."""

    def __init__(self, per_minute: float, burst: int = 0, clock: Callable[[], float] = time.monotonic, max_devices: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst or max(1, round(per_minute)))
        self.clock = clock
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, device: str) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, last = self._buckets.get(device, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[device] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_devices:  # bounded memory under a flood of device ids
            self._buckets.pop(next(iter(self._buckets)))
        return ok
