"""A cheap stochastic objective over the fleet's adapter tensors, for simulated devices.

Simulated devices do not run a language model. Each one pulls the global adapters
toward a target of its own data domain, by a few noisy gradient steps on

    f_g(theta) = 1/2 * mean_j (theta_j - t_{g,j})^2,        t_g = theta_0 + s * (sqrt(c) * S + sqrt(1 - c) * D_g) * m

where ``S`` is shared by every domain (what federated training can learn from all devices),
``D_g`` belongs to domain ``g`` (the non-IID part), and ``m`` is a heavy-tailed per-coordinate
magnitude shared by all domains, like real adapter deltas whose mass sits in few coordinates
(so that top-k sparsification is meaningful). Everything is drawn from one seed, so the
coordinator's versions can be scored exactly by anyone holding the same config.

The held-out loss is normalised: 1.0 at version 0, and :attr:`SimObjective.optimum` at the
best single model for the union of all domains (the mean target).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.errors import ConfigError


@dataclass(frozen=True)
class ObjectiveConfig:
    """The simulated learning problem (the same for every device process and the scorer)."""

    domains: int = 10
    """Data domains; device ``i`` holds domain ``i % domains``."""
    seed: int = 0
    scale: float = 0.05
    """Typical size of a target offset, relative to nothing: adapters start near 0."""
    shared: float = 0.8
    """Fraction of the target variance shared by all domains (0: nothing to gain from others)."""
    heavy_tail: float = 0.75
    """Sigma of the log-normal per-coordinate magnitudes (0: every coordinate alike)."""
    local_steps: int = 5
    lr: float = 0.1
    noise: float = 0.5
    """Gradient noise per step, relative to the per-coordinate magnitude (minibatch noise)."""

    def __post_init__(self) -> None:
        if self.domains < 1:
            raise ConfigError(f"objective.domains must be at least 1, got {self.domains}")
        if not 0.0 <= self.shared <= 1.0:
            raise ConfigError(f"objective.shared must be in [0, 1], got {self.shared}")
        if not 0.0 < self.lr <= 1.0:
            raise ConfigError(f"objective.lr must be in (0, 1], got {self.lr}")
        if self.local_steps < 1:
            raise ConfigError(f"objective.local_steps must be at least 1, got {self.local_steps}")
        if self.scale <= 0 or self.noise < 0 or self.heavy_tail < 0:
            raise ConfigError("objective.scale must be positive; noise and heavy_tail must not be negative")


class SimObjective:
    """Targets, local updates and the union loss for a given version-0 state."""

    def __init__(self, cfg: ObjectiveConfig, v0: Mapping[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.names = sorted(v0)
        self.shapes = {n: tuple(np.shape(v0[n])) for n in self.names}
        sizes = [int(np.prod(self.shapes[n])) for n in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.theta0 = self.flatten(v0)
        n = self.theta0.size
        rng = np.random.default_rng([cfg.seed, 0x0B1EC7])
        mag = np.exp(cfg.heavy_tail * rng.standard_normal(n)).astype(np.float32)
        self.magnitude = (mag / np.sqrt(np.mean(mag**2))).astype(np.float32)  # rms 1
        shared = rng.standard_normal(n).astype(np.float32)
        own = rng.standard_normal((cfg.domains, n)).astype(np.float32)
        mix = np.sqrt(cfg.shared) * shared[None, :] + np.sqrt(1.0 - cfg.shared) * own
        self.targets = (self.theta0[None, :] + cfg.scale * mix * self.magnitude[None, :]).astype(np.float32)
        self._norm = float(np.mean((self.targets - self.theta0[None, :]) ** 2))
        self.optimum = self.loss_flat(self.targets.mean(axis=0))

    # -- layout ----------------------------------------------------------------------

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ConfigError(f"state lacks tensors {missing[:3]} of the simulated spec")
        return np.concatenate([np.asarray(state[n], np.float32).reshape(-1) for n in self.names])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {
            n: flat[self.offsets[i] : self.offsets[i + 1]].reshape(self.shapes[n]).astype(np.float32, copy=False)
            for i, n in enumerate(self.names)
        }

    # -- the problem -----------------------------------------------------------------

    def domain_of(self, device_index: int) -> int:
        return device_index % self.cfg.domains

    def loss_flat(self, theta: np.ndarray) -> float:
        """Mean over domains of the squared distance to each target, 1.0 at version 0."""
        d = self.targets - theta[None, :]
        return float(np.mean(d * d) / self._norm)

    def loss(self, state: Mapping[str, np.ndarray]) -> float:
        return self.loss_flat(self.flatten(state))

    def domain_loss(self, state: Mapping[str, np.ndarray], domain: int) -> float:
        d = self.targets[domain] - self.flatten(state)
        return float(np.mean(d * d) / self._norm)

    def local_update(self, state: Mapping[str, np.ndarray], domain: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The delta of ``local_steps`` noisy gradient steps on domain ``domain`` from ``state``.

        The steps are linear, so they are taken in closed form: ``E`` steps of rate ``lr`` move
        ``(1 - (1 - lr)^E)`` of the way to the target, and their summed noise is one Gaussian
        draw with the same variance as ``E`` separate ones.
        """
        c = self.cfg
        start = self.flatten(state)
        keep = (1.0 - c.lr) ** c.local_steps
        delta = np.float32(1.0 - keep) * (self.targets[domain] - start)
        if c.noise:
            # sum_k lr * (1 - lr)^k * eps_k for k < E: variance lr^2 * (1 - keep^2) / (1 - (1 - lr)^2)
            spread = c.lr * np.sqrt((1.0 - keep**2) / (1.0 - (1.0 - c.lr) ** 2)) if c.lr < 1.0 else 1.0
            sigma = np.float32(c.noise * c.scale * spread) * self.magnitude
            delta -= sigma * rng.standard_normal(start.size, dtype=np.float32)
        return self.unflatten(delta)
