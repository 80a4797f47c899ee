"""Local differential privacy on the device, with its own accounting.

Before compression, a round's delta (over every trainable tensor) is clipped and noised:

- ``gaussian``: L2 clip to ``clip``, then ``N(0, (noise_multiplier * clip)^2)`` on every coordinate;
- ``laplace``: L1 clip to ``clip``, then ``Laplace(clip / epsilon_per_round)`` on every
  coordinate (pure ``epsilon_per_round``-DP per round).

Everything after the noise (top-k, quantization, error feedback) is post-processing of
the noised delta, so the guarantee holds for what leaves the device. The device counts its
noised rounds (in ``state.json``) and reports its own ε at ``delta`` in its heartbeat,
composed with dp-accounting (RDP for Gaussian rounds; Laplace rounds via PLD), with no
sampling amplification.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edge_agent.errors import ConfigError


@dataclass(frozen=True)
class DPSGDConfig:
    """Record-level DP-SGD on the device (``[privacy.sgd]``): each example's gradient is clipped
    to ``clip`` in L2, the batch's sum gets ``N(0, (noise_multiplier * clip)^2)`` on every
    trainable coordinate, and batches are drawn uniformly without replacement, a fixed size,
    independently each step. The device accounts its steps (dp-accounting's RDP accountant for
    that sampling, substitution of one example) and reports ``dpsgd_epsilon`` in its heartbeat."""

    enabled: bool = False
    clip: float = 1.0
    """The L2 bound of one example's gradient (over every trainable tensor)."""
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.noise_multiplier < 0 or not 0.0 < self.delta < 1.0:
            raise ConfigError("privacy.sgd.clip must be positive, noise_multiplier non-negative, delta in (0, 1)")


@dataclass(frozen=True)
class LocalDPConfig:
    mechanism: Literal["none", "gaussian", "laplace"] = "none"
    clip: float = 1.0
    """L2 (Gaussian) or L1 (Laplace) bound of one round's delta."""
    noise_multiplier: float = 1.0
    """Gaussian: noise standard deviation in units of ``clip``."""
    epsilon_per_round: float = 1.0
    """Laplace: ε of one round."""
    delta: float = 1e-5
    """δ at which ε is reported."""
    sgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    """Record-level DP-SGD (``[privacy.sgd]``), independent of the update-level mechanism above."""

    def __post_init__(self) -> None:
        if self.mechanism not in ("none", "gaussian", "laplace"):
            raise ConfigError(f"privacy.mechanism must be none, gaussian or laplace, got {self.mechanism!r}")
        if self.clip <= 0 or self.noise_multiplier <= 0 or self.epsilon_per_round <= 0:
            raise ConfigError("privacy.clip, privacy.noise_multiplier and privacy.epsilon_per_round must be positive")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")


def privatize(delta: Mapping[str, np.ndarray], cfg: LocalDPConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The clipped, noised delta (``mechanism = "none"`` returns it unchanged)."""
    if cfg.mechanism == "none":
        return dict(delta)
    if cfg.mechanism == "gaussian":
        norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values()))
    else:
        norm = sum(float(np.abs(d).astype(np.float64).sum()) for d in delta.values())
    factor = min(1.0, cfg.clip / max(norm, 1e-12))
    out = {}
    for name, d in delta.items():
        clipped = np.asarray(d, dtype=np.float64) * factor
        if cfg.mechanism == "gaussian":
            noise = rng.normal(0.0, cfg.noise_multiplier * cfg.clip, size=clipped.shape)
        else:
            noise = rng.laplace(0.0, cfg.clip / cfg.epsilon_per_round, size=clipped.shape)
        out[name] = (clipped + noise).astype(np.float32)
    return out


def _accounting() -> Any:
    """dp-accounting, which an agent needs only with local DP or DP-SGD (the ``privacy`` extra)."""
    try:
        import dp_accounting
        import dp_accounting.pld.pld_privacy_accountant
        import dp_accounting.rdp.rdp_privacy_accountant
    except ImportError:
        raise ConfigError("privacy accounting needs dp-accounting: pip install 'fedge[agent,privacy]'") from None
    return dp_accounting


@functools.lru_cache(maxsize=1024)
def local_epsilon(rounds: int, mechanism: str, noise_multiplier: float, epsilon_per_round: float, delta: float) -> float:
    """This device's ε after ``rounds`` noised rounds."""
    if rounds <= 0 or mechanism == "none":
        return 0.0
    dp_accounting = _accounting()
    pld_privacy_accountant = dp_accounting.pld.pld_privacy_accountant
    rdp_privacy_accountant = dp_accounting.rdp.rdp_privacy_accountant

    if mechanism == "gaussian":
        rdp = rdp_privacy_accountant.RdpAccountant()
        rdp.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
        return float(rdp.get_epsilon(delta))
    # Laplace with scale clip/eps on L1 sensitivity clip: noise parameter 1/eps in units of the sensitivity.
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(1.0 / epsilon_per_round), rounds))
    return min(float(pld.get_epsilon(delta)), rounds * epsilon_per_round)


@functools.lru_cache(maxsize=1024)
def dpsgd_epsilon(steps: int, examples: int, batch_size: int, noise_multiplier: float, delta: float) -> float:
    """Sample-level ε after ``steps`` DP-SGD steps, each a batch of ``batch_size`` drawn uniformly
    without replacement from ``examples``: dp-accounting's RDP accountant for that sampling
    (substitution of one example), with amplification by it."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import logging

    dp_accounting = _accounting()
    rdp_privacy_accountant = dp_accounting.rdp.rdp_privacy_accountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        examples, min(batch_size, examples), dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))
