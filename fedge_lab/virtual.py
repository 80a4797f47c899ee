"""The two halves of an in-process federated run, with no broker: a virtual device's local round,
and the coordinator's side of it (validation of staleness, the engine, the downlink, and the
versions devices may still train on).

:func:`fedge_lab.simulation.simulate` schedules them in virtual time; the benchmarks schedule
them in lock step (every device trains on the same version, then the updates arrive one after
another). Both run the daemons' own code: :func:`edge_agent.train.train_round` and the
uplink codec on the device side, :class:`coordinator.engine.Engine` and
:func:`coordinator.downlink.next_version` on the coordinator's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compression import CodecConfig, ErrorFeedback, apply_delta, compress_update, decode_frame
from compression.frame import SparseTensor
from coordinator.downlink import next_version
from coordinator.engine import Accepted, Engine, Step
from coordinator.errors import Rejection
from coordinator.privacy import DPConfig
from coordinator.strategies import Strategy
from coordinator.strategy import StrategyConfig
from edge_agent.config import TrainConfig
from edge_agent.data import LocalData
from edge_agent.model import get_trainable, set_trainable
from edge_agent.train import train_round

TensorMap = Mapping[str, "np.ndarray | SparseTensor"]


@dataclass(frozen=True)
class ModelIO:
    """The shared model, and how its trained tensors are read and written (the adapters by
    default; a benchmark may train something else, such as Fed-SB cores)."""

    model: Any
    get: Callable[[Any], dict[str, np.ndarray]] = get_trainable
    set: Callable[[Any, dict[str, np.ndarray]], None] = set_trainable

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.set(self.model, state)

    def read(self) -> dict[str, np.ndarray]:
        return self.get(self.model)


def dense_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``tensors`` as dense fp32."""
    return sum(int(t.size) * 4 for t in tensors.values())


@dataclass(frozen=True)
class Upload:
    """One device's update, as the coordinator decodes it."""

    device: str
    base: int
    """The version it was trained on."""
    samples: int
    tensors: TensorMap
    wire_bytes: int
    """Its frame's size (dense fp32 bytes when the uplink is uncompressed)."""
    dense_fp32_bytes: int


@dataclass
class VirtualDevice:
    """What one virtual device keeps between rounds: its data, its RNG, its residual, its speed."""

    name: str
    data: LocalData
    rng: np.random.Generator
    speed: float = 1.0
    """How many times slower than the fastest device it trains (virtual time only)."""
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    base: int = 0
    """The version of its current (or last) round."""

    def train(self, io: ModelIO, state: dict[str, np.ndarray], base: int, train: TrainConfig, uplink: CodecConfig | None) -> Upload:
        """One local round from ``state`` (version ``base``), through the device's codec.

        ``uplink=None`` sends the delta uncompressed (fp32), with no residual."""
        io.load(state)
        rr = train_round(io.model, self.data, train, self.rng)
        local = io.read()
        delta = {n: local[n] - state[n] for n in state}
        dense = dense_bytes(delta)
        self.base = base
        if uplink is None:
            return Upload(self.name, base, rr.samples, delta, dense, dense)
        up = compress_update(delta, uplink, self.feedback, phase=base)
        self.feedback = up.feedback
        return Upload(self.name, base, rr.samples, decode_frame(up.frame).tensors, len(up.frame), dense)


@dataclass(frozen=True)
class VersionMade:
    version: int
    updates: int
    """Updates it was made from."""
    mean_staleness: float
    weights: tuple[float, ...]
    """The weight each of its updates really got."""
    bytes_down: int
    """Its global-delta frame (dense fp32 bytes when the downlink is uncompressed)."""
    state: dict[str, np.ndarray]
    """Its global state."""


class SimCoordinator:
    """The coordinator of an in-process run: the engine, the downlink and its residual, and
    the global states of the versions a device may still report on (staler ones are dropped).

    ``downlink=None`` applies each step uncompressed (fp32). ``dp`` runs the engine's central DP
    (DP-FedBuff: each update clipped, the buffer's mean noised), seeded by ``dp.seed``."""

    def __init__(
        self,
        cfg: StrategyConfig,
        v0: dict[str, np.ndarray],
        downlink: CodecConfig | None,
        *,
        strategy: Strategy | None = None,
        dp: DPConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg, shapes={k: tuple(v.shape) for k, v in v0.items()}, strategy=strategy, dp=dp)
        self.downlink = downlink
        self.feedback = ErrorFeedback()
        self.states: dict[int, dict[str, np.ndarray]] = {0: {k: v.copy() for k, v in v0.items()}}
        self.rejected: Counter[str] = Counter()
        self._ids = 0

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current global state."""
        return self.states[self.engine.version]

    def base_state(self, version: int) -> dict[str, np.ndarray] | None:
        """The global state of ``version``, or ``None`` once it is staler than the strategy takes."""
        return self.states.get(version)

    def submit(self, up: Upload, now: float) -> list[VersionMade]:
        """The coordinator's side of one upload: staleness, admission, the engine, and the
        versions it completes (none while it waits in a buffer or round)."""
        if self.engine.version - up.base > self.cfg.effective_max_staleness or up.base not in self.states:
            self.rejected["too_stale"] += 1
            return []
        try:
            self.engine.admit(up.device)
        except Rejection as rej:
            self.rejected[rej.reason] += 1
            return []
        self._ids += 1
        accepted = Accepted(f"{up.device}#{self._ids}", up.device, up.base, up.samples, up.tensors)
        return self._versions(self.engine.offer(accepted, now), now)

    def poll(self, now: float) -> list[VersionMade]:
        """Versions whose round closes by time (a FedAvg deadline)."""
        return self._versions(self.engine.poll(now), now)

    def rebase(self, state: dict[str, np.ndarray]) -> None:
        """The current version now stands for ``state``: the same model in new coordinates (a Fed-SB
        refresh). The downlink residual, which was in the old ones, starts again from zero."""
        self.states = {self.engine.version: state}
        self.feedback = ErrorFeedback()

    def _versions(self, step: Step | None, now: float) -> list[VersionMade]:
        made = []
        while step is not None:
            try:
                state, nbytes = self._next(step)
            except Rejection as rej:
                self.engine.drop(step)
                self.rejected[rej.reason] += len(step.updates)
                break
            self.engine.commit(step, now)
            self.states[step.version] = state
            keep = self.cfg.effective_max_staleness
            for v in [v for v in self.states if v < step.version - keep]:
                del self.states[v]
            staleness = float(np.mean(step.staleness)) if step.staleness else 0.0
            made.append(VersionMade(step.version, len(step.updates), staleness, step.weights, nbytes, state))
            step = self.engine.poll(now)
        return made

    def _next(self, step: Step) -> tuple[dict[str, np.ndarray], int]:
        current = self.states[self.engine.version]
        if self.downlink is None:
            if not all(np.all(np.isfinite(v)) for v in step.step.values()):
                raise Rejection("non_finite", "the global step is not finite")
            return apply_delta(current, step.step), dense_bytes(step.step)
        nxt = next_version(current, step.step, self.downlink, self.feedback, step.version)
        self.feedback = nxt.feedback
        return nxt.state, len(nxt.frame)
