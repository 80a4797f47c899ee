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
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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


def _poisson_events(cohorts: tuple[tuple[int, int], ...], noise_multiplier: float) -> Any:
    """The cohorts as Poisson sampling at ``q = size / eligible``, each then a Gaussian (the cross-check's model)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    parts = [
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(min(1.0, size / eligible), gaussian), count)
        for (eligible, size), count in sorted(Counter(cohorts).items())
    ]
    return dp_accounting.ComposedDpEvent(parts)


def _checked(cohorts: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out = []
    for eligible, size in cohorts:
        if not 0 < size <= eligible:
            raise ValueError(f"a cohort of {size} devices sampled from {eligible} eligible ones is not a sample")
        out.append((int(eligible), int(size)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _rdp_curve(eligible: int, size: int, noise_multiplier: float) -> np.ndarray:
    """RDP at dp-accounting's default orders of one cohort: ``size`` of ``eligible`` without
    replacement, then a Gaussian (``REPLACE_ONE``)."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP drops orders it cannot evaluate, and says so per order
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(eligible, size, dp_accounting.GaussianDpEvent(noise_multiplier)))
    return np.asarray(acc._rdp, dtype=np.float64)  # noqa: SLF001 - the curve the accountant composes; its public API gives ε only


@functools.lru_cache(maxsize=1024)
def _amplified(cohorts: tuple[tuple[int, int], ...], noise_multiplier: float, delta: float, method: str) -> float:
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if method == "rdp":
        # RDP composes by adding: each distinct cohort shape's curve is computed once (the slow
        # part), then the fleet's is their weighted sum, converted to (ε, δ) as the accountant does.
        total = sum(n * _rdp_curve(e, s, noise_multiplier) for (e, s), n in Counter(cohorts).items())
        return float(rdp_privacy_accountant.compute_epsilon(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, total, delta)[0])
    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant: Any = pld_privacy_accountant.PLDAccountant() if method == "pld_poisson" else rdp_privacy_accountant.RdpAccountant()
    accountant.compose(_poisson_events(cohorts, noise_multiplier))
    return float(accountant.get_epsilon(delta))


def amplified_epsilon(
    cohorts: Sequence[tuple[int, int]],
    noise_multiplier: float,
    delta: float,
    method: Literal["rdp", "pld_poisson", "rdp_poisson"] = "rdp",
) -> float:
    """ε of a device across ``cohorts`` (``(eligible, size)`` each), with amplification by sampling.

    ``rdp`` is the claim: the cohorts are drawn uniformly without replacement, a fixed size from
    the eligible devices (:class:`coordinator.cohorts.CohortPlanner`), and dp-accounting
    supports that sampling in its RDP accountant only, under substitution of one device
    (``REPLACE_ONE``). ``pld_poisson`` (PLD) and ``rdp_poisson`` model the same cohorts as
    Poisson sampling at ``q = size / eligible`` under adding or removing one device: a
    cross-check, not the claim. A smaller pool is a larger ``q``, so eligible counts rounded
    down never give less ε."""
    if noise_multiplier <= 0:
        return math.inf if cohorts else 0.0
    checked = _checked(cohorts)
    if not checked:
        return 0.0
    return _amplified(checked, float(noise_multiplier), float(delta), method)


def calibrate_noise(
    cohorts: Sequence[tuple[int, int]], target_epsilon: float, delta: float, method: Literal["rdp", "pld_poisson", "rdp_poisson"] = "rdp"
) -> float:
    """The smallest noise multiplier (within 0.1%) whose :func:`amplified_epsilon` over ``cohorts`` is at most ``target_epsilon``."""
    if target_epsilon <= 0:
        raise ValueError(f"a target epsilon must be positive, got {target_epsilon}")
    lo, hi = 0.05, 1.0
    while amplified_epsilon(cohorts, hi, delta, method) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon} over {len(cohorts)} cohorts")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if amplified_epsilon(cohorts, mid, delta, method) > target_epsilon else (lo, mid)
    return hi


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
