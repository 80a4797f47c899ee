"""Aggregation maths as pure functions over numpy arrays.

FedAsync (Xie et al., 2019): on each update from a device that trained on version
``base``, with staleness ``tau = current - base``::

    x_{t+1} = x_t + alpha * s(tau) * delta

where ``delta = local - x_base`` and ``s`` is a staleness weight. ``s(tau) = (1 + tau)^-a``
is the polynomial weight; ``constant`` and ``hinge`` are the other two from the paper.
Aggregation is per tensor: an update changes only the tensors it carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class FedAsyncConfig:
    """FedAsync parameters."""

    alpha: float = 0.6
    """Mixing rate: how much of one fresh update enters the global model."""
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = 0.5
    """Exponent of the polynomial weight, or slope of the hinge."""
    b: int = 4
    """Hinge: staleness up to ``b`` has full weight."""
    max_staleness: int = 64
    """Updates staler than this are rejected."""

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"strategy.alpha must be in (0, 1], got {self.alpha}")
        if self.a < 0:
            raise ValueError(f"strategy.a must be non-negative, got {self.a}")
        if self.b < 0 or self.max_staleness < 0:
            raise ValueError("strategy.b and strategy.max_staleness must be non-negative")


def staleness_weight(tau: int, cfg: FedAsyncConfig) -> float:
    """``s(tau)``: 1 for a fresh update, decreasing with staleness."""
    if tau < 0:
        raise ValueError(f"staleness must be non-negative, got {tau}")
    if cfg.staleness == "constant":
        return 1.0
    if cfg.staleness == "polynomial":
        return float((1.0 + tau) ** (-cfg.a))
    if tau <= cfg.b:
        return 1.0
    return float(1.0 / (cfg.a * (tau - cfg.b) + 1.0))


def fedasync_step(delta: Mapping[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """The global step of one update: ``weight * delta`` for each tensor it carries.

    The caller adds it to the global state (through the downlink codec, so that devices
    can follow exactly); tensors the update does not carry do not move.
    """
    w = np.float32(weight)
    return {name: (w * np.asarray(d, dtype=np.float32)).astype(np.float32) for name, d in delta.items()}
