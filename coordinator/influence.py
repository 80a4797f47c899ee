"""Bounded influence: how far one update may move the global model, and how much its
self-reported sample count may weigh. Pure: numbers in, numbers out.

- **Norm bound.** ``adaptive`` (the default) refuses an update whose L2 norm exceeds
  ``norm_factor`` times the median norm of the last ``norm_window`` accepted updates.
  Until ``norm_warmup`` norms are known, the bound is ``norm_factor`` times the norm of
  the global state itself: no single update may move the model by more than a few times
  its own size. ``fixed`` uses ``max_update_norm``; ``off`` turns the check off.
- **Sample counts.** A device's claim is capped by its enrolment's ``max_samples`` (when
  set), by ``max_num_samples``, and by ``sample_factor`` times the median of the other
  devices' last weighted counts, so that one device can never buy the fleet's weight by
  claiming 10^12 samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def norm_bound(rule: str, *, fixed: float, factor: float, warmup: int, recent: Sequence[float], global_norm: float) -> float:
    """The largest L2 norm an update may have now; 0 means no bound."""
    if rule == "off":
        return 0.0
    if rule == "fixed":
        return fixed
    bound = factor * _median(recent) if len(recent) >= warmup else factor * global_norm
    if bound <= 0.0:
        bound = factor * max(global_norm, 1e-3)
    return min(bound, fixed) if fixed > 0 else bound


def _median(values: Sequence[float]) -> float:
    """``np.median`` of a short window, without its overhead (it runs for every update)."""
    s = sorted(values)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def cap_samples(claim: int, *, enrolled_cap: int | None, hard_cap: int, factor: float, others: Sequence[int]) -> int:
    """The sample count an update is weighted with."""
    cap = hard_cap
    if enrolled_cap is not None and enrolled_cap > 0:
        cap = min(cap, enrolled_cap)
    if others:
        # The lower median: with two devices, the honest one's count bounds the other.
        ordered = sorted(others)
        cap = min(cap, max(1, int(factor * ordered[(len(ordered) - 1) // 2])))
    return max(0, min(claim, cap))


SAMPLE_WINDOW = 64
"""Devices whose last sample counts bound the next device's claim."""


class InfluenceTracker:
    """The running inputs of both bounds: recent accepted norms, the global state's norm, and the
    last weighted sample count of recent devices. ``mark``/``restore`` undo a message's effect."""

    def __init__(self, limits: Any, recent_norms: Sequence[float], last_samples: dict[str, int], global_norm: float) -> None:
        import collections

        self.limits = limits
        self.norms: collections.deque[float] = collections.deque(recent_norms, limits.norm_window)
        self.samples: collections.OrderedDict[str, int] = collections.OrderedDict(list(last_samples.items())[-SAMPLE_WINDOW:])
        self.global_norm = global_norm

    def bound(self) -> float:
        lim = self.limits
        return norm_bound(
            lim.norm_bound,
            fixed=lim.max_update_norm,
            factor=lim.norm_factor,
            warmup=lim.norm_warmup,
            recent=self.norms,
            global_norm=self.global_norm,
        )

    def capped_samples(self, device: str, claim: int, enrolled_cap: int | None) -> int:
        others = [n for d, n in self.samples.items() if d != device]
        lim = self.limits
        return cap_samples(claim, enrolled_cap=enrolled_cap, hard_cap=lim.max_num_samples, factor=lim.sample_factor, others=others)

    def observe(self, device: str, norm: float, samples: int) -> None:
        """An update was accepted with this norm and (capped) sample count."""
        self.norms.append(norm)
        self.samples.pop(device, None)
        self.samples[device] = samples
        while len(self.samples) > SAMPLE_WINDOW:
            self.samples.popitem(last=False)

    def mark(self) -> tuple[Any, ...]:
        import collections

        return (collections.deque(self.norms, self.norms.maxlen), collections.OrderedDict(self.samples), self.global_norm)

    def restore(self, mark: tuple[Any, ...]) -> None:
        self.norms, self.samples, self.global_norm = mark


def state_norm(state: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in state.values())))
