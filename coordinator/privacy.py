"""Central differential privacy: DP-FedBuff aggregation and a per-device accountant.

DP-FedBuff (DESIGN §5), for a buffer of at most one update per device:

1. each update is weighted by staleness, then clipped to L2 norm ``C`` (over all tensors);
2. the clipped updates are summed and divided by the fixed ``K`` (the buffer size), not by
   how many arrived, so one device moves the mean by at most ``C / K``;
3. Gaussian noise ``N(0, (z C / K)^2)`` is added to every coordinate of the mean, once per
   buffer; then ``x <- x + eta_g * mean``.

Accounting. A device that contributes to a buffer takes part in one Gaussian mechanism
with noise multiplier ``z`` (sensitivity ``C``, noise ``z C`` on the sum). The coordinator
does not sample devices at random (they arrive when they arrive), so no sampling
amplification is claimed: a device's ε is the composition of its participations, computed
with dp-accounting's PLD accountant and cross-checked with its RDP accountant (RDP is never
tighter). The running service enforces budgets with RDP (microseconds a call, and never
below PLD, so it cannot overspend); ``status`` and ``devices`` report the PLD value (about
a second per distinct participation count). The fleet's ε is the largest device ε.
Participation counts live in SQLite and survive restarts; ε is recomputed from them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class DPConfig:
    """Central DP (``[dp]`` in the coordinator's config). Only with ``strategy.kind = "fedbuff"``."""

    enabled: bool = False
    clip: float = 1.0
    """C: the L2 bound of one (staleness-weighted) update."""
    noise_multiplier: float = 1.0
    """z: noise standard deviation on the sum, in units of C."""
    delta: float = 1e-5
    epsilon_budget: float = 0.0
    """Budget per device (0 = none). Past it, ``enforce`` decides."""
    enforce: Literal["device", "fleet", "off"] = "device"
    """``device``: stop aggregating that device's updates; ``fleet``: stop aggregating anyone's; ``off``: report only."""
    seed: int | None = None
    """Noise seed, for tests and benchmarks only (None draws from the OS)."""

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.noise_multiplier < 0:
            raise ValueError("dp.clip must be positive and dp.noise_multiplier non-negative")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget < 0:
            raise ValueError("dp.epsilon_budget must be non-negative")
        if self.enforce not in ("device", "fleet", "off"):
            raise ValueError(f"dp.enforce must be device, fleet or off, got {self.enforce!r}")


@functools.lru_cache(maxsize=4096)
def epsilon(participations: int, noise_multiplier: float, delta: float, method: Literal["pld", "rdp"] = "pld") -> float:
    """ε after ``participations`` Gaussian mechanisms of noise multiplier ``z`` (no sampling)."""
    if participations <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), participations)
    accountant = pld_privacy_accountant.PLDAccountant() if method == "pld" else rdp_privacy_accountant.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def clip_factor(norm: float, clip: float) -> float:
    return min(1.0, clip / max(norm, 1e-12))


def dp_mean(
    deltas: Sequence[Mapping[str, np.ndarray]],
    shapes: Mapping[str, tuple[int, ...]],
    staleness_weights: Sequence[float],
    cfg: DPConfig,
    buffer_size: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The noised DP-FedBuff mean of one buffer, over every tensor in ``shapes``."""
    return dp_aggregate(deltas, shapes, staleness_weights, cfg, buffer_size, rng)[0]


def dp_aggregate(
    deltas: Sequence[Mapping[str, np.ndarray]],
    shapes: Mapping[str, tuple[int, ...]],
    staleness_weights: Sequence[float],
    cfg: DPConfig,
    buffer_size: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """The noised DP-FedBuff mean of one buffer, and the weight each update got in it:
    ``s_i * clip_factor(s_i * ||delta_i||) / K``.

    Every tensor gets noise, including tensors no update carried: which tensors moved is
    itself information."""
    acc = {name: np.zeros(int(np.prod(shape)), dtype=np.float64) for name, shape in shapes.items()}
    weights = []
    for delta, s in zip(deltas, staleness_weights, strict=True):
        norm = s * math.sqrt(sum(float(np.square(np.asarray(d, dtype=np.float64)).sum()) for d in delta.values()))
        f = s * clip_factor(norm, cfg.clip)
        weights.append(f / buffer_size)
        for name, d in delta.items():
            acc[name] += f * np.asarray(d, dtype=np.float64).reshape(-1)
    sigma = cfg.noise_multiplier * cfg.clip / buffer_size
    out = {}
    for name, total in acc.items():
        mean = total / buffer_size
        if sigma > 0:
            mean = mean + rng.normal(0.0, sigma, size=mean.shape)
        out[name] = mean.astype(np.float32).reshape(shapes[name])
    return out, weights
