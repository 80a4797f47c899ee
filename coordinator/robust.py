"""Robust aggregation of one buffer of updates, as pure numpy functions.

The rank-based functions take the updates of one tensor stacked as rows (``[n, d]``,
float32; a row is one device's staleness-weighted delta) and return the aggregate row;
:func:`coordinator.strategy.buffered_step` applies the rules:

- **norm bound** (``clip``): every row is scaled down to L2 norm ``C`` at most, then the
  weighted mean is taken. It bounds what any one device can move, without trusting a
  majority;
- **trimmed mean**: per coordinate, the ``k = floor(beta * n)`` largest and smallest values
  are dropped and the rest averaged (Yin et al., 2018);
- **coordinate median** (Yin et al., 2018);
- **Multi-Krum** (Blanchard et al., 2017): each row scores the sum of squared distances to
  its ``n - f - 2`` nearest rows; the ``m`` best-scoring rows are averaged.

The rank-based rules ignore sample weights (a weight is something an attacker could
claim); the norm bound keeps them. numpy on CPU: the stacks are small (n ≤ buffer size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Rule = Literal["none", "norm_bound", "trimmed_mean", "median", "multi_krum"]


@dataclass(frozen=True)
class RobustConfig:
    rule: Rule = "none"
    clip: float = 1.0
    """norm_bound: the L2 bound C of one update (over all its tensors)."""
    trim: float = 0.2
    """trimmed_mean: the fraction beta trimmed from each end, per coordinate (< 0.5)."""
    krum_f: int = 1
    """multi_krum: the number of Byzantine updates tolerated (f)."""
    krum_m: int = 0
    """multi_krum: how many of the best rows are averaged (0 = n - f)."""

    def __post_init__(self) -> None:
        if self.rule not in ("none", "norm_bound", "trimmed_mean", "median", "multi_krum"):
            raise ValueError(f"robust.rule must be none, norm_bound, trimmed_mean, median or multi_krum, got {self.rule!r}")
        if self.clip <= 0:
            raise ValueError(f"robust.clip must be positive, got {self.clip}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"robust.trim must be in [0, 0.5), got {self.trim}")
        if self.krum_f < 0 or self.krum_m < 0:
            raise ValueError("robust.krum_f and robust.krum_m must be non-negative")


def trimmed_mean(rows: np.ndarray, beta: float) -> np.ndarray:
    n = rows.shape[0]
    k = int(np.floor(beta * n))
    if n - 2 * k < 1:
        raise ValueError(f"trimming {k} from each end of {n} updates leaves none")
    if k == 0:
        return rows.mean(axis=0)
    ordered = np.sort(rows, axis=0)
    return ordered[k : n - k].mean(axis=0)


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    return np.median(rows, axis=0).astype(np.float32)


def krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each row: the sum of squared distances to its ``n - f - 2`` nearest others."""
    n = rows.shape[0]
    neighbours = n - f - 2
    if neighbours < 1:
        raise ValueError(f"Multi-Krum needs n > f + 2 (n={n}, f={f})")
    sq = np.sum(rows.astype(np.float64) ** 2, axis=1)
    dist = sq[:, None] + sq[None, :] - 2.0 * rows.astype(np.float64) @ rows.astype(np.float64).T
    np.fill_diagonal(dist, np.inf)
    dist = np.maximum(dist, 0.0)
    return np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)


def multi_krum_select(rows: np.ndarray, f: int, m: int = 0) -> np.ndarray:
    """Indices of the ``m`` (default ``n - f``) rows with the lowest Krum scores."""
    n = rows.shape[0]
    m = m or n - f
    return np.argsort(krum_scores(rows, f), kind="stable")[: max(1, min(m, n))]
