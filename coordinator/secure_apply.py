"""The coordinator service's secure-aggregation turn: route the rounds' messages, then apply
each cohort whose rounds are over, whole, in one transaction (:mod:`coordinator.secure`)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from compression import FrameKind, compress_dense
from coordinator.cohorts import Cohorts, NoCohorts
from coordinator.errors import Rejection
from coordinator.intake import offer_derived
from coordinator.secure import SecureCohort, SecureRounds
from coordinator.store import LedgerEntry

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)


def open_secure(svc: CoordinatorService) -> SecureRounds | None:
    cfg = svc.cfg
    if not cfg.secagg.enabled:
        return None
    if (dp := cfg.secagg.dp) is not None:  # what status and devices account with
        meta = {"noise_multiplier": dp.noise_multiplier, "delta": dp.delta, "amplified": True, "distributed": True}
        svc.store.set_meta("dp", json.dumps(meta))
    return SecureRounds(
        cfg.secagg, cfg.fleet, svc.shapes, svc.store.identity, svc._signer, lambda t, p: svc.link.publish_secagg(t, p), cfg.cohorts.seed
    )


def handle_secagg(svc: CoordinatorService, device: str, payload: bytes) -> None:
    """A message on ``device``'s secagg topic: routing only, nothing durable until a cohort unmasks."""
    if svc.secure is None:
        log.warning("ignored a secure-aggregation message from %s: this fleet does not run secure aggregation", device)
        return
    try:
        svc.secure.handle(device, payload, time.time())
    except Rejection as rej:
        svc.outcomes.reject(device, rej)


def secure_turn(svc: CoordinatorService) -> None:
    """Close the rounds whose time is up, then apply (or drop) every cohort whose rounds are over."""
    if svc.secure is None:
        return
    svc.secure.tick(time.time())
    for sc in svc.secure.take_finished():
        apply_cohort(svc, sc)


def apply_cohort(svc: CoordinatorService, sc: SecureCohort) -> None:
    """Settle the cohort's members and offer its unmasked mean to the engine as one update,
    in one transaction: a cohort is applied whole or not at all."""
    from coordinator.service import STORAGE_ERRORS

    mark = svc._mark()
    try:
        with svc.store.batch():
            settle(svc.cohorts, sc, time.time())
            if sc.total is None:
                svc.outcomes.reject(None, Rejection("secagg", f"cohort {sc.id} failed: {sc.failed}"))
            else:
                _offer(svc, sc)
    except STORAGE_ERRORS as exc:
        svc._restore(mark)
        assert svc.secure is not None
        svc.secure.open[sc.id] = sc  # settled on the next turn
        log.error("storage error while applying cohort %s; retrying: %s", sc.id, exc)
        return
    svc._after_commit()


def settle(cohorts: Cohorts | NoCohorts, sc: SecureCohort, now: float) -> None:
    """The cohort's rounds are over (in the caller's transaction): its survivors reported, every
    other member still in flight a dropout, and their slots free."""
    assert isinstance(cohorts, Cohorts), "secure aggregation runs over cohorts"
    survivors = set(sc.survivors)
    for device in sc.cohort.members:
        state = "reported" if device in survivors else "dropped"
        cur = cohorts.db.execute(
            "UPDATE cohort_members SET state=?, ts=? WHERE cohort=? AND device=? AND state='invited'", (state, now, sc.id, device)
        )
        if cur.rowcount and state == "dropped":
            cohorts.dropouts += 1
        if cohorts.planner.in_flight.get(device, ("",))[0] == sc.id:
            del cohorts.planner.in_flight[device]
    cohorts.report()


def _offer(svc: CoordinatorService, sc: SecureCohort) -> None:
    """The cohort's mean, as one update based on the version its members were invited on (the
    oldest any of them could have trained on), weighted by how many members it sums."""
    c = sc.cohort
    staleness = svc.version - c.version
    if staleness > svc.cfg.strategy.effective_max_staleness:
        svc.outcomes.reject(
            None, Rejection("too_stale", f"cohort {c.cohort} was invited on v{c.version}, and the fleet is at v{svc.version}")
        )
        return
    mean = sc.mean_step(svc.shapes)
    frame = compress_dense(mean, FrameKind.UPDATE)  # its ledger row records the size of the lossless mean
    entry = LedgerEntry(f"secagg-{c.cohort}", f"secagg:{c.cohort}", 0, c.version, staleness, 0.0, len(sc.u3), len(frame), None)
    log.info("cohort %s unmasked: the sum of %d of %d members (threshold %d)", c.cohort, len(sc.u3), sc.n, sc.t)
    offer_derived(svc, entry, mean, frame)
