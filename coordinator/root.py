"""The root of a federation of sites: it takes sites' partial aggregates as it takes devices' updates.

A site aggregator (``docs/sites.md``) forwards signed partials on ``fl/<fleet>/sites/<site>/partial``
(:mod:`compression.partial`). For each one the root, inside the batch's transaction:

1. verifies it with the site's enrolled key, and refuses a partial id it has already
   committed as a duplicate (it acknowledges it again, so a site that missed the ack stops
   resending);
2. turns each group into one update of the engine: delta ``sum / weight``, ``weight``
   samples, trained on the group's base version. That is exactly FedBuff's sample-weighted
   mean of the covered updates, and the strategy weights the group by its staleness as it
   would each of them. A group is never refused as too stale: the covered updates were
   already acknowledged at the site, and each counts exactly once;
3. records the partial and every device update id it covers (``partials``,
   ``partial_updates``: an id covered twice is refused, which is the cross-tier exactly-once
   check), the groups' ledger rows, and whatever version they complete;
4. after the commit, acknowledges the partial on ``fl/<fleet>/sites/<site>/ack``, signed by
   the fleet key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from compression import FrameLimits, decode_frame, protocol
from compression.errors import CodecError, ProtocolError
from compression.partial import Partial, PartialAck, PartialError, decode
from coordinator.errors import Rejection
from coordinator.identity import enrolled_key
from coordinator.intake import offer_derived
from coordinator.store import LedgerEntry

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)


def site_verifier(identity: Mapping[str, object] | None, site: str) -> protocol.Verifier:
    """The check of ``site``'s enrolled Ed25519 key (raises :class:`PartialError` if it has none)."""
    verify = enrolled_key(identity)
    if verify is None:
        raise PartialError(f"site {site!r} is not enrolled (or was revoked): partials are signed by an enrolled site key")
    return verify


def group_means(p: Partial, shapes: Mapping[str, tuple[int, ...]], max_frame_bytes: int) -> list[dict[str, np.ndarray]]:
    """Each group's mean delta (``sum / weight``), checked against the fleet's tensors; raises
    :class:`PartialError` for a group whose frame does not decode, has other tensors, or is not finite."""
    limits = FrameLimits.for_shapes(shapes, max_frame_bytes)
    out = []
    for i, g in enumerate(p.groups):
        try:
            dense = decode_frame(g.frame, limits).dense()
        except CodecError as exc:
            raise PartialError(f"partial {p.partial_id} group {i}: {exc}") from None
        if {k: tuple(v.shape) for k, v in dense.items()} != dict(shapes):
            raise PartialError(f"partial {p.partial_id} group {i}: its tensors are not the fleet's trainable tensors")
        mean = {k: (v.astype(np.float64) / g.weight).astype(np.float32) for k, v in dense.items()}
        if not all(np.isfinite(v).all() for v in mean.values()):
            raise PartialError(f"partial {p.partial_id} group {i}: its weighted sum is not finite")
        out.append(mean)
    return out


def _covered_before(db: Any, update_ids: list[str]) -> str | None:
    """An id of ``update_ids`` that a committed partial already covers (queried in chunks: a
    partial may cover more ids than SQLite takes variables in one statement)."""
    for i in range(0, len(update_ids), 500):
        chunk = update_ids[i : i + 500]
        row = db.execute(
            f"SELECT update_id FROM partial_updates WHERE update_id IN ({','.join('?' * len(chunk))}) LIMIT 1", chunk
        ).fetchone()
        if row is not None:
            return str(row[0])
    return None


def handle_partial(svc: CoordinatorService, topic: str, payload: bytes) -> None:
    """One message on ``fl/<fleet>/sites/<site>/partial``, in the batch's transaction (see the module docstring)."""
    try:
        _fleet, site, leaf = protocol.parse_site_topic(topic)
    except ProtocolError as exc:
        svc.outcomes.reject(None, Rejection("malformed_topic", str(exc)))
        return
    if leaf in ("status", "bridge"):
        return site_seen(svc, site, leaf, payload)
    if leaf != "partial":
        log.warning("ignored a message on %s: the root reads partials, statuses and bridge states only", topic)
        return
    store = svc.store
    try:
        p = decode(payload, lambda s: site_verifier(store.identity(s), s), svc.cfg.limits.max_update_bytes * 64)
        if p.site != site:
            raise PartialError(f"a partial on {site}'s topic names site {p.site}")
    except PartialError as exc:
        svc.outcomes.reject(site, Rejection("malformed", f"partial: {exc}"))
        return
    if store.db.execute("SELECT 1 FROM partials WHERE partial_id=?", (p.partial_id,)).fetchone() is not None:
        svc.outcomes.duplicates += 1
        svc.outcomes.acks_out.append(PartialAck(site, p.partial_id, "duplicate", svc.version))  # the site missed the first ack
        return
    if svc.cfg.dp.enabled:
        svc.outcomes.reject(
            site, Rejection("malformed", "this root runs central DP, which clips per device; a partial's group is many devices")
        )
        return
    if (future := max(g.base_version for g in p.groups)) > svc.version:
        svc.outcomes.reject(
            site, Rejection("future_version", f"partial {p.partial_id} has a group on v{future}; the fleet is at v{svc.version}")
        )
        return
    try:
        means = group_means(p, svc.shapes, svc.cfg.limits.max_update_bytes * 8)
    except PartialError as exc:
        svc.outcomes.reject(site, Rejection("malformed", str(exc)))
        return
    now = time.time()
    covered = [(u, p.partial_id) for g in p.groups for u in g.update_ids]
    clash = _covered_before(store.db, [u for u, _ in covered])
    if clash is not None:
        svc.outcomes.reject(site, Rejection("duplicate", f"partial {p.partial_id} covers update {clash}, which another partial covered"))
        return
    store.db.execute(
        "INSERT INTO partials(partial_id, site, seq, updates, received) VALUES (?,?,?,?,?)", (p.partial_id, site, p.seq, p.updates, now)
    )
    store.db.executemany("INSERT INTO partial_updates(update_id, partial_id) VALUES (?,?)", covered)
    for i, (g, mean) in enumerate(zip(p.groups, means, strict=True)):
        staleness = max(0, svc.version - g.base_version)
        samples = int(round(g.weight))
        entry = LedgerEntry(f"{p.partial_id}/{i}", f"site:{site}", p.seq, g.base_version, staleness, 0.0, samples, len(g.frame), None)
        offer_derived(svc, entry, mean)
    svc.metrics.accepted.inc(p.updates)
    svc.metrics.site_updates.labels(site=site).inc(p.updates)
    svc.outcomes.acks_out.append(PartialAck(site, p.partial_id, "applied", svc.version))
    log.info("partial %s from %s: %d device update(s) in %d group(s)", p.partial_id, site, p.updates, len(p.groups))


def site_seen(svc: CoordinatorService, site: str, leaf: str, payload: bytes) -> None:
    """A site's status (its coordinator/status, remapped up the bridge) or its bridge's state, for the fleet view.

    Only an enrolled site is recorded, and only a bounded JSON object or ``0``/``1``: the root's
    view of its sites never grows with what a stranger publishes."""
    store = svc.store
    if store.identity(site) is None:
        return
    now = time.time()
    if leaf == "bridge":
        up = protocol.bridge_state(payload)
        if up is None:
            return
        store.db.execute(
            "INSERT INTO sites(site, bridge, bridge_changed) VALUES (?,?,?) "
            "ON CONFLICT(site) DO UPDATE SET bridge=excluded.bridge, bridge_changed=excluded.bridge_changed",
            (site, "up" if up else "down", now),
        )
        svc.metrics.site_bridge.labels(site=site).set(up)
        return
    status = protocol.site_status_object(payload)
    if status is None:
        log.warning("ignored a status from site %s: not a JSON object of at most %d bytes", site, protocol.MAX_SITE_STATUS)
        return
    store.db.execute(
        "INSERT INTO sites(site, status, last_seen) VALUES (?,?,?) "
        "ON CONFLICT(site) DO UPDATE SET status=excluded.status, last_seen=excluded.last_seen",
        (site, json.dumps(status), now),
    )
    svc.metrics.site_status(site, status, svc.version)
