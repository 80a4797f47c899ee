"""Making a version in the service: closing a round whose deadline passed, and committing a step.

Both run on the service's single worker. A round closes between batches, in a batch of its
own, so that the version is published only after its commit; a step is committed with the
exact weight each update got, in the open batch's transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from coordinator.engine import Step
from coordinator.errors import Rejection
from coordinator.influence import state_norm

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)


def close_round(svc: CoordinatorService) -> None:
    """A round whose deadline passed closes here, between batches, in a batch of its own."""
    from coordinator.service import STORAGE_ERRORS

    if not svc.buffer:
        return
    assert not svc.store.in_batch, "a round closes only between batches, so that it publishes after its commit"
    mark = svc._mark()
    try:
        with svc.store.batch():
            step = svc.engine.poll(time.monotonic(), svc._online_count())
            if step is None:
                return
            log.info("round %d closes with %d updates", svc.version + 1, len(step.updates))
            commit_step(svc, step)
    except STORAGE_ERRORS as exc:
        svc._restore(mark)
        log.error("storage error while closing round %d; retrying: %s", svc.version + 1, exc)
        return
    except Exception as exc:  # noqa: BLE001 - a strategy's failure: the round stays open, the service stays up
        svc._restore(mark)
        error = f"strategy error closing round {svc.version + 1}: {type(exc).__name__}: {exc}"
        if error != svc._strategy_error:
            log.error("%s; the buffer waits", error)
        svc._strategy_error = error
        return
    svc._strategy_error = None
    svc._after_commit()


def commit_step(svc: CoordinatorService, step: Step) -> bool:
    """Commit ``step`` with the exact weight of each update; False if it was refused (not finite),
    in which case its buffered updates are dropped and counted."""
    entries = [replace(u.ref.entry, staleness=tau, weight=w) for u, w, tau in zip(step.updates, step.weights, step.staleness, strict=True)]
    try:
        down_bytes = svc.versions.commit(step, entries)  # see Versions.commit
    except Rejection as rej:
        svc.engine.drop(step)
        dropped = svc.store.drop_buffer(rej.reason)
        if dropped:
            log.error("buffer of %d updates dropped: %s", dropped, rej.detail)
            svc.outcomes.reject(None, rej, dropped, record=False)
        return False
    svc.engine.commit(step, time.monotonic(), svc._online_count())
    if down_bytes is not None:  # else the state moves when the merging batch ends (CoordinatorService._process)
        svc.influence.global_norm = state_norm(svc.versions.state)
    svc.outcomes.counts["accepted"] += len(entries)
    svc.metrics.applied.inc(len(entries))
    svc.outcomes.counts["versions"] += 1
    if step.participants:
        svc.metrics.epsilon_max.set(svc.fleet_epsilon())
    devices = ",".join(sorted({e.device for e in entries}))
    down = "" if down_bytes is None else f", downlink {down_bytes} B"
    log.info("v%d from %d update(s) (%s)%s", step.version, len(entries), devices, down)
    return True
