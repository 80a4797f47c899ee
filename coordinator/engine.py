"""The aggregation engine: the coordinator's policy, pure, with time passed in.

It holds the current version, the updates waiting for the next one, the strategy's state
and, under central DP, each device's participations. The MQTT service, the simulation API
and the benchmarks drive the same engine:

- :meth:`Engine.admit` refuses an update the policy does not take now (a second update of
  a device in a FedAvg round or a DP buffer, a spent privacy budget) with a
  :class:`~coordinator.errors.Rejection` whose reason the device hears;
- :meth:`Engine.offer` takes an accepted update and ``now``; it returns ``None`` (the
  update waits) or the :class:`Step` of a new version;
- :meth:`Engine.poll` closes a round whose deadline passed;
- the shell commits a step durably, then calls :meth:`Engine.commit` (or :meth:`Engine.drop`
  when the step could not be committed).

A :class:`Step` records the exact weight each update got: 0 for one a robust rule dropped,
the clipped weight under DP. :meth:`mark` and :meth:`restore` undo an offer whose handling
failed later in the shell.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compression.frame import SparseTensor
from coordinator.errors import Rejection
from coordinator.privacy import DPConfig, dp_aggregate, epsilon
from coordinator.strategies import BufferView, State, Strategy, load_strategy
from coordinator.strategy import StrategyConfig, WeightedUpdate, staleness_weight


@dataclass(frozen=True)
class Accepted:
    """An update that passed validation, as the engine sees it."""

    update_id: str
    device: str
    base_version: int
    num_samples: int
    delta: Mapping[str, np.ndarray | SparseTensor]
    ref: Any = None
    """The shell's own record of the update (its ledger entry and frame); the engine never reads it."""


class StrategyError(ValueError):
    """A strategy answered something the engine cannot use (wrong tensors, weights or state)."""


@dataclass(frozen=True)
class Step:
    """A new version's step, and what each of its updates counted for."""

    version: int
    """The version this step makes."""
    step: dict[str, np.ndarray]
    weights: tuple[float, ...]
    """The weight each update really got (same order as ``updates``)."""
    state: State = field(default_factory=dict)
    """The strategy's state after this step: store it with the version."""
    updates: tuple[Accepted, ...] = ()
    staleness: tuple[int, ...] = ()
    participants: tuple[str, ...] = ()
    """Devices whose DP participation this step counts (central DP only)."""


@dataclass
class _Mark:
    version: int
    buffer: list[Accepted]
    state: State
    participations: dict[str, int] | None
    started: float
    online: int


class Engine:
    """The policy of one fleet. Not thread-safe: one shell thread drives it."""

    def __init__(
        self,
        cfg: StrategyConfig,
        *,
        shapes: Mapping[str, tuple[int, ...]],
        version: int = 0,
        dp: DPConfig | None = None,
        strategy: Strategy | None = None,
        buffered: Sequence[Accepted] = (),
        state: State | None = None,
        participations: Mapping[str, int] | None = None,
        now: float = 0.0,
        dp_rng: np.random.Generator | None = None,
        amplified: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy if strategy is not None else load_strategy(cfg)
        self.dp = dp if dp is not None else DPConfig()
        self.shapes = dict(shapes)
        self.version = version
        self.buffer: list[Accepted] = list(buffered)
        self.state: State = dict(state or {})
        self.participations: dict[str, int] = dict(participations or {})
        self.started = now
        self.online_at_start = 0
        self._dp_rng = dp_rng if dp_rng is not None else np.random.default_rng(self.dp.seed)
        self.amplified = amplified
        """Under cohorts, the ε with amplification by their sampling (the same bound for every
        device: each could have been sampled in every cohort); None counts participations."""

    # -- admission -------------------------------------------------------------------

    def admit(self, device: str) -> None:
        """Raise :class:`Rejection` if the policy does not take an update of ``device`` now."""
        waiting = any(u.device == device for u in self.buffer)
        if self.dp.enabled and waiting:
            raise Rejection("one_per_buffer", f"{device} already has an update in this DP buffer")
        if self.strategy.one_per_device and waiting:
            raise Rejection(
                "one_per_round", f"{device} already has an update in round {self.version + 1}; train again on version {self.version + 1}"
            )
        if self.dp.enabled:
            self._dp_budget(device)

    def device_epsilon(self, device: str, extra: int = 0) -> float:
        """RDP: microseconds per call, and never below PLD, so enforcing a budget with it cannot overspend."""
        if self.amplified is not None:
            return self.amplified()  # the cohort of this device's update is already counted
        return epsilon(self.participations.get(device, 0) + extra, self.dp.noise_multiplier, self.dp.delta, "rdp")

    def fleet_epsilon(self) -> float:
        if self.dp.enabled and self.amplified is not None:
            return self.amplified()
        if not self.dp.enabled or not self.participations:
            return 0.0
        return epsilon(max(self.participations.values()), self.dp.noise_multiplier, self.dp.delta, "rdp")

    def _dp_budget(self, device: str) -> None:
        budget, enforce = self.dp.epsilon_budget, self.dp.enforce
        if budget <= 0 or enforce == "off":
            return
        if enforce == "fleet" and (spent := self.fleet_epsilon()) >= budget:
            raise Rejection("privacy_budget", f"the fleet has spent its privacy budget (epsilon {spent:.3g} >= {budget:g})")
        if enforce == "device" and (after := self.device_epsilon(device, extra=1)) > budget:
            raise Rejection("privacy_budget", f"{device} would exceed its privacy budget (epsilon {after:.3g} > {budget:g})")

    # -- buffering and closing -------------------------------------------------------

    def view(self, now: float, online: int) -> BufferView:
        """The waiting updates as a strategy sees them; ``online``: devices online now."""
        return BufferView(
            updates=len(self.buffer),
            devices=len({u.device for u in self.buffer}),
            waited_s=max(0.0, now - self.started),
            online=self.online_at_start or online,
            version=self.version,
        )

    def offer(self, update: Accepted, now: float, online: int = 0) -> Step | None:
        """Take an admitted update: ``None`` while it waits, or the step of the version it completes."""
        self.buffer.append(update)
        return self.poll(now, online)

    def poll(self, now: float, online: int = 0) -> Step | None:
        """The step of the next version if the waiting updates make one now (a deadline passed)."""
        if not self.buffer or not self._closes(now, online):
            return None
        return self._close()

    def _closes(self, now: float, online: int) -> bool:
        if self.dp.enabled:
            return len(self.buffer) >= self.cfg.buffer_size
        return bool(self.strategy.closes(self.view(now, online)))

    def _close(self) -> Step:
        members = tuple(self.buffer)
        staleness = tuple(self.version - u.base_version for u in members)
        updates = [WeightedUpdate(u.delta, u.num_samples, tau) for u, tau in zip(members, staleness, strict=True)]
        if self.dp.enabled:
            deltas = [{n: t.to_dense() if isinstance(t, SparseTensor) else t for n, t in u.delta.items()} for u in updates]
            s = [staleness_weight(u.staleness, self.cfg) for u in updates]
            mean, weights = dp_aggregate(deltas, self.shapes, s, self.dp, self.cfg.buffer_size, self._dp_rng)
            lr = np.float32(self.cfg.server_lr)
            step = {n: (lr * v).astype(np.float32) for n, v in mean.items()}
            return Step(
                self.version + 1,
                step,
                tuple(self.cfg.server_lr * w for w in weights),
                self.state,
                updates=members,
                staleness=staleness,
                participants=tuple(u.device for u in members),
            )
        agg = self.strategy.aggregate(updates, self.state)
        return Step(self.version + 1, *self._checked(agg, len(members)), updates=members, staleness=staleness)

    def _checked(self, agg: Any, n: int) -> tuple[dict[str, np.ndarray], tuple[float, ...], State]:
        """A strategy's answer, checked: tensors of the global state in its shapes, one finite weight per update, arrays as state."""
        if len(agg.weights) != n:
            raise StrategyError(f"the strategy returned {len(agg.weights)} weights for {n} updates")
        weights = tuple(float(w) for w in agg.weights)
        if not all(np.isfinite(w) for w in weights):
            raise StrategyError(f"the strategy returned a weight that is not finite: {weights}")
        step: dict[str, np.ndarray] = {}
        for name, t in agg.step.items():
            arr = np.asarray(t, dtype=np.float32)
            if name not in self.shapes or arr.shape != self.shapes[name]:
                raise StrategyError(f"the strategy's step has {name!r} of shape {arr.shape}, which the global state does not have")
            step[name] = arr
        try:
            state = {str(k): np.asarray(v, dtype=np.float32) for k, v in agg.state.items()}
        except (TypeError, ValueError) as exc:
            raise StrategyError(f"the strategy's state must be arrays of numbers: {exc}") from None
        return step, weights, state

    # -- after the shell ---------------------------------------------------------------

    def commit(self, step: Step, now: float, online: int = 0) -> None:
        """The shell durably committed ``step``: move to its version and start the next round."""
        if step.version != self.version + 1:
            raise ValueError(f"step makes version {step.version}, but the engine is at {self.version}")
        ids = {u.update_id for u in step.updates}
        self.buffer = [u for u in self.buffer if u.update_id not in ids]
        self.version = step.version
        self.state = step.state
        for d in step.participants:
            self.participations[d] = self.participations.get(d, 0) + 1
        self.started = now
        self.online_at_start = online

    def drop(self, step: Step) -> None:
        """``step`` could not be committed (it was not finite): its updates leave the buffer."""
        ids = {u.update_id for u in step.updates}
        self.buffer = [u for u in self.buffer if u.update_id not in ids]

    def mark(self) -> _Mark:
        """Everything an offer may change, to undo it."""
        parts = dict(self.participations) if self.dp.enabled else None
        return _Mark(self.version, list(self.buffer), self.state, parts, self.started, self.online_at_start)

    def restore(self, mark: _Mark) -> None:
        self.version, self.buffer, self.state = mark.version, mark.buffer, mark.state
        if mark.participations is not None:
            self.participations = mark.participations
        self.started, self.online_at_start = mark.started, mark.online
