"""The strategy protocol, the built-in strategies, and loading a user's strategy from config.

A strategy answers two questions for the engine (:mod:`coordinator.engine`):

- **when** the waiting updates become a version (:meth:`Strategy.closes`, given a
  :class:`BufferView`), and whether a device may have more than one update waiting
  (:attr:`Strategy.one_per_device`: FedAvg's rounds of devices);
- **how** they become the global step (:meth:`Strategy.aggregate`), with the weight each
  update really got, and the strategy's next state (a server optimizer's moments).

Strategies are pure: state comes in and goes out as arrays, which the coordinator stores
with each version, so that it survives restarts and a kill -9 with the version it belongs
to. ``strategy.kind = "package.module:Class"`` loads a user's class; it is built as
``Class(cfg, **cfg.options)``. Subclass :class:`BaseStrategy` to get the defaults.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from compression.frame import SparseTensor
from coordinator.strategy import StrategyConfig, WeightedUpdate, aggregate_buffer, fedasync_weight

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class BufferView:
    """What a strategy may look at to decide that the waiting updates make a version."""

    updates: int
    """Updates waiting."""
    devices: int
    """Distinct devices among them."""
    waited_s: float
    """Seconds since the current version was made (a round's age)."""
    online: int
    """Devices online when the current version was made (or now, if none were then)."""
    version: int
    """The current version."""


@dataclass(frozen=True)
class Aggregate:
    """A strategy's answer for one closed buffer."""

    step: dict[str, np.ndarray]
    """What to add to the global state (before the downlink codec)."""
    weights: list[float]
    """The weight each update really got, in the order given: 0 for one a robust rule dropped."""
    state: State = field(default_factory=dict)
    """The strategy's state after this step (empty for stateless strategies)."""


@runtime_checkable
class Strategy(Protocol):
    """What the engine needs of a strategy. See :class:`BaseStrategy` for the defaults."""

    one_per_device: bool
    """At most one waiting update per device (a FedAvg round); a second is refused as ``one_per_round``."""

    def closes(self, view: BufferView) -> bool:
        """Whether the waiting updates make a version now."""
        ...

    def aggregate(self, updates: Sequence[WeightedUpdate], state: State) -> Aggregate:
        """The global step of ``updates`` (staleness already set), given the state of the last version."""
        ...


class BaseStrategy:
    """Defaults for a strategy: no state, any number of updates per device, closes at ``buffer_size``."""

    one_per_device = False

    def __init__(self, cfg: StrategyConfig, **options: Any) -> None:
        self.cfg = cfg
        self.options = options

    def closes(self, view: BufferView) -> bool:
        return view.updates >= self.cfg.buffer_size

    def aggregate(self, updates: Sequence[WeightedUpdate], state: State) -> Aggregate:
        step, weights = aggregate_buffer(updates, self.cfg)
        return Aggregate(step, weights, state)


class FedAsync(BaseStrategy):
    """Each update makes a version: ``x += alpha * s(tau) * delta``."""

    def closes(self, view: BufferView) -> bool:
        return view.updates >= 1

    def aggregate(self, updates: Sequence[WeightedUpdate], state: State) -> Aggregate:
        step: dict[str, np.ndarray] = {}
        weights = []
        for u in updates:
            w = fedasync_weight(u.staleness, self.cfg)
            weights.append(w)
            for name, d in u.delta.items():
                dense = d.to_dense() if isinstance(d, SparseTensor) else np.asarray(d, dtype=np.float32)
                step[name] = step.get(name, 0.0) + np.float32(w) * dense
        return Aggregate({n: np.asarray(v, dtype=np.float32) for n, v in step.items()}, weights, state)


class FedBuff(BaseStrategy):
    """A version from every ``buffer_size`` updates, staleness-weighted, with the robust rule."""


class FedAvg(BaseStrategy):
    """Synchronous rounds of devices: at most one update per device; a round closes when its
    target of devices reported, or at the deadline with ``min_participants``."""

    one_per_device = True

    def closes(self, view: BufferView) -> bool:
        s = self.cfg
        target = s.round_participants or max(s.min_participants, view.online)
        return view.devices >= target or (view.waited_s >= s.round_deadline_s and view.devices >= s.min_participants)


class FedOpt(FedBuff):
    """FedAdam / FedYogi (Reddi et al., 2021) over FedBuff's buffers.

    The buffer's weighted mean delta ``g`` (FedBuff's step with ``server_lr = 1``) is the
    pseudo-gradient; the server keeps moments per coordinate::

        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2                    (Adam)
        v = v - (1 - b2) g^2 sign(v - g^2)         (Yogi)
        x += lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + tau)

    The moments and ``t`` are the strategy's state, stored with every version. The weight
    recorded for an update is its share of ``g``.
    """

    yogi = False

    def aggregate(self, updates: Sequence[WeightedUpdate], state: State) -> Aggregate:
        mean, weights = aggregate_buffer(updates, replace(self.cfg, server_lr=1.0))
        o = self.cfg.optimizer
        t = int(state["t"][0]) + 1 if "t" in state else 1
        out: State = {k: v for k, v in state.items() if k != "t"}
        eta = o.lr * float(np.sqrt(1.0 - o.beta2**t) / (1.0 - o.beta1**t))
        step: dict[str, np.ndarray] = {}
        for name, g in mean.items():
            g64 = g.astype(np.float64)
            m = state.get(f"m/{name}")
            v = state.get(f"v/{name}")
            m = np.zeros_like(g64) if m is None or m.shape != g.shape else m.astype(np.float64)
            v = np.zeros_like(g64) if v is None or v.shape != g.shape else v.astype(np.float64)
            m = o.beta1 * m + (1.0 - o.beta1) * g64
            g2 = g64 * g64
            v = v - (1.0 - o.beta2) * g2 * np.sign(v - g2) if self.yogi else o.beta2 * v + (1.0 - o.beta2) * g2
            step[name] = (eta * m / (np.sqrt(v) + o.tau)).astype(np.float32)
            out[f"m/{name}"] = m.astype(np.float32)
            out[f"v/{name}"] = v.astype(np.float32)
        out["t"] = np.array([t], dtype=np.float32)
        return Aggregate(step, weights, out)


class FedAdam(FedOpt):
    pass


class FedYogi(FedOpt):
    yogi = True


BUILTINS: Mapping[str, type[BaseStrategy]] = {
    "fedasync": FedAsync,
    "fedbuff": FedBuff,
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


class StrategyLoadError(ValueError):
    """``strategy.kind`` names a user strategy that cannot be loaded or does not fit the protocol."""


def load_strategy(cfg: StrategyConfig) -> Strategy:
    """The strategy ``cfg.kind`` names: a built-in, or ``"package.module:Class"`` built as
    ``Class(cfg, **cfg.options)``."""
    builtin = BUILTINS.get(cfg.kind)
    if builtin is not None:
        if cfg.options:
            raise StrategyLoadError(f"strategy.options is for user strategies; {cfg.kind!r} takes none")
        return builtin(cfg)
    module_name, _, attr = cfg.kind.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error, named as such
        raise StrategyLoadError(f"strategy.kind {cfg.kind!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise StrategyLoadError(f"strategy.kind {cfg.kind!r}: {module_name!r} has no attribute {attr!r}")
    try:
        strategy = cls(cfg, **cfg.options)
    except Exception as exc:  # noqa: BLE001 - a user constructor's failure is a configuration error
        raise StrategyLoadError(f"strategy.kind {cfg.kind!r}: building it failed ({type(exc).__name__}: {exc})") from None
    missing = [m for m in ("closes", "aggregate") if not callable(getattr(strategy, m, None))]
    if missing or not isinstance(getattr(strategy, "one_per_device", None), bool):
        raise StrategyLoadError(
            f"strategy.kind {cfg.kind!r} does not fit the Strategy protocol (needs closes(), aggregate() and a bool "
            f"one_per_device; missing {missing or ['one_per_device']}); see docs/strategies.md"
        )
    return strategy  # type: ignore[no-any-return]
