"""The global state and how it moves: a step through the downlink codec, its durable commit, and
the versions waiting to be published once the batch that made them has committed.

Inside :meth:`Versions.merging` (the service's batch of queued messages), the versions the
batch makes are committed as one: each keeps its number, its ledger rows and its strategy
step, but their steps go through the downlink codec together, as one delta from the last
published version to the batch's last, and only that version's state is written and
published. Under a flood, with many versions a batch, this is what keeps the cost of a
version (the downlink's top-k, the state file, the snapshot) from growing with the rate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from compression import ErrorFeedback
from coordinator.config import CoordinatorConfig
from coordinator.downlink import next_version
from coordinator.engine import Step
from coordinator.errors import Rejection
from coordinator.store import LedgerEntry, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    version: int
    state: dict[str, np.ndarray]
    delta_frame: bytes
    base: int
    """The version the delta applies to."""


@dataclass(frozen=True)
class _Held:
    """A version made inside a merging batch, whose step waits for the batch's end."""

    version: int
    step: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    update_id: str | None


@dataclass
class Versions:
    """The current global state and the coordinator's downlink residual."""

    cfg: CoordinatorConfig
    store: Store
    state: dict[str, np.ndarray]
    downlink: ErrorFeedback
    version: int
    """The version ``state`` is (the last one with a state of its own)."""
    pending: list[Published] = field(default_factory=list)
    """Versions committed in the open batch, to publish after its commit."""
    held: list[_Held] = field(default_factory=list)
    merge: bool = False

    def mark(self) -> tuple[dict[str, np.ndarray], ErrorFeedback, int, int, int]:
        return self.state, self.downlink, self.version, len(self.pending), len(self.held)

    def restore(self, mark: tuple[dict[str, np.ndarray], ErrorFeedback, int, int, int]) -> None:
        self.state, self.downlink, self.version, n, h = mark
        del self.pending[n:]
        del self.held[h:]

    def commit(self, step: Step, entries: list[LedgerEntry]) -> int | None:
        """Send ``step`` through the downlink codec, apply exactly what is sent, and write the
        version with its ledger rows (in the open batch's transaction); returns the delta frame's
        size, or None when the step is held to be sent with the merging batch's last version.
        Raises :class:`~coordinator.errors.Rejection` (``non_finite``) and writes nothing if
        the step, or the new state, would not be finite."""
        if not all(np.all(np.isfinite(v)) for v in step.step.values()):
            raise Rejection("non_finite", "the global step is not finite")
        if self.merge:
            self.store.record_ledger(entries, step.version)
            if step.participants:
                self.store.add_participations(list(step.participants))
            self.held.append(_Held(step.version, step.step, step.state, entries[-1].update_id if entries else None))
            return None
        frame = self._write(step.version, step.step, entries, step.state, None)
        if step.participants:
            self.store.add_participations(list(step.participants))
        return len(frame)

    def _write(
        self, version: int, step: dict[str, np.ndarray], entries: list[LedgerEntry], state: dict[str, np.ndarray], update_id: str | None
    ) -> bytes:
        nxt = next_version(self.state, step, self.cfg.downlink, self.downlink, version)
        self.store.commit_version(
            version,
            nxt.state,
            entries,
            self.cfg.keep_versions,
            residual=nxt.feedback.residual,
            delta_frame=nxt.frame,
            strategy_state=state,
            update_id=update_id,
        )
        self.pending.append(Published(version, nxt.state, nxt.frame, self.version))
        self.state, self.downlink, self.version = nxt.state, nxt.feedback, version
        return nxt.frame

    @contextmanager
    def merging(self, enabled: bool = True) -> Iterator[None]:
        """Hold the versions made inside the block and commit them as one at its end (still
        inside the caller's transaction). Raises :class:`Rejection` (``non_finite``) if their
        steps together would make the state overflow; the caller then undoes the block and
        makes it again without merging, so that the step that overflows is the one refused."""
        self.merge = enabled
        try:
            yield
        finally:
            self.merge = False
        if not self.held:
            return
        held, last = self.held, self.held[-1]
        step = dict(held[0].step)
        with np.errstate(over="ignore"):  # an overflow is refused by next_version, by name
            for h in held[1:]:
                step = {k: v + h.step[k] for k, v in step.items()}
        for h in held[:-1]:
            self.store.merged_version(h.version, h.update_id)
        frame = self._write(last.version, step, [], last.state, last.update_id)
        self.held = []
        if len(held) > 1:
            log.info("v%d-v%d published as one delta from v%d, %d B", held[0].version, last.version, self.pending[-1].base, len(frame))

    def take_pending(self) -> list[Published]:
        out, self.pending = self.pending, []
        return out
