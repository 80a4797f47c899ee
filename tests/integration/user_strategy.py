"""A user strategy, loaded by the coordinator from ``strategy.kind = "tests.integration.user_strategy:Scaled"``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.strategies import Aggregate, BaseStrategy, BufferView
from coordinator.strategy import StrategyConfig, WeightedUpdate


class Scaled(BaseStrategy):
    """Every ``every`` updates, the plain mean times ``factor``; counts the versions it made in its state."""

    def __init__(self, cfg: StrategyConfig, factor: float = 1.0, every: int = 2) -> None:
        super().__init__(cfg)
        self.factor, self.every = factor, every

    def closes(self, view: BufferView) -> bool:
        return view.updates >= self.every

    def aggregate(self, updates: Sequence[WeightedUpdate], state: dict[str, np.ndarray]) -> Aggregate:
        w = self.factor / len(updates)
        step: dict[str, np.ndarray] = {}
        for u in updates:
            for name, d in u.delta.items():
                dense = d.to_dense() if hasattr(d, "to_dense") else np.asarray(d, np.float32)
                step[name] = step.get(name, np.zeros_like(dense)) + np.float32(w) * dense
        made = state.get("made", np.zeros(1, np.float32)) + 1
        return Aggregate(step, [w] * len(updates), {"made": made})


class Broken(BaseStrategy):
    """A user strategy whose aggregation always fails."""

    def closes(self, view: BufferView) -> bool:
        return view.updates >= 1

    def aggregate(self, updates: Sequence[WeightedUpdate], state: dict[str, np.ndarray]) -> Aggregate:
        raise RuntimeError("this rule is broken")
