"""The global state and how it moves: a step through the downlink codec, its durable commit, and
the versions waiting to be published once the batch that made them has committed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compression import ErrorFeedback
from coordinator.config import CoordinatorConfig
from coordinator.downlink import next_version
from coordinator.engine import Step
from coordinator.store import LedgerEntry, Store


@dataclass(frozen=True)
class Published:
    version: int
    state: dict[str, np.ndarray]
    delta_frame: bytes


@dataclass
class Versions:
    """The current global state and the coordinator's downlink residual."""

    cfg: CoordinatorConfig
    store: Store
    state: dict[str, np.ndarray]
    downlink: ErrorFeedback
    pending: list[Published] = field(default_factory=list)
    """Versions committed in the open batch, to publish after its commit."""

    def mark(self) -> tuple[dict[str, np.ndarray], ErrorFeedback, int]:
        return self.state, self.downlink, len(self.pending)

    def restore(self, mark: tuple[dict[str, np.ndarray], ErrorFeedback, int]) -> None:
        self.state, self.downlink, n = mark
        del self.pending[n:]

    def commit(self, step: Step, entries: list[LedgerEntry]) -> bytes:
        """Send ``step`` through the downlink codec, apply exactly what is sent, and write the
        version with its ledger rows (in the open batch's transaction); returns the delta frame.
        Raises :class:`~coordinator.errors.Rejection` (``non_finite``) and writes nothing if
        the new state would not be finite."""
        nxt = next_version(self.state, step.step, self.cfg.downlink, self.downlink, step.version)
        self.store.commit_version(
            step.version,
            nxt.state,
            entries,
            self.cfg.keep_versions,
            residual=nxt.feedback.residual,
            delta_frame=nxt.frame,
            strategy_state=step.state,
        )
        if step.participants:
            self.store.add_participations(list(step.participants))
        self.state, self.downlink = nxt.state, nxt.feedback
        self.pending.append(Published(step.version, nxt.state, nxt.frame))
        return nxt.frame

    def take_pending(self) -> list[Published]:
        out, self.pending = self.pending, []
        return out
