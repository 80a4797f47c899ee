"""Site mode: a coordinator that aggregates for the root of a federation (``docs/sites.md``).

To its own devices, on its own broker, a site aggregator is a coordinator: validation,
replay protection, the ledger, durability, cohorts, secure aggregation and its rejection
counters are the service's. What differs:

- **It follows the root's versions.** The root's signed meta, delta and snapshot come down
  the bridge unchanged; the site verifies them with the root's fleet key
  (``site.root_public_key``) through :class:`~compression.follower.Follower`, the same rule
  its devices use, and stores each version it reaches. It never makes or publishes one.
- **It forwards partials.** Accepted updates wait in the buffer (a strategy that never
  closes holds them). Every ``partial_every_s``, or at ``partial_max_updates``, they leave
  it as one signed partial (:mod:`compression.partial`), in one transaction: the partial's
  bytes in ``site_partials``, each update's ledger row and its ``partial_updates`` row.
  After the commit the partial is published, and it is resent until the root's signed ack
  names it: after ``resend_s``, then at twice the interval each time (up to 16 ×), never
  while the site broker says its bridge is down, and at once when the bridge comes back.
  A kill -9 before the commit leaves the updates in the buffer; after it, the partial is
  resent on restart, and the root deduplicates it by id.
- **Backlog.** While ``max_unacked`` partials wait for acks (the bridge is down), no new
  partial is made; once the buffer also holds ``partial_max_updates`` updates, new updates
  are refused as ``backlog``, and the devices hear it.

It signs with the key the root enrolled it with (``site.signing_key``): partials, and the
acks and invitations its devices verify with their ``site_public_key``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compression import CodecError, FrameKind, compress_dense, protocol, state_digest
from compression.follower import Follower
from compression.frame import SparseTensor
from compression.keys import ed25519_verifier, load_private_key
from compression.partial import MAX_GROUPS, Group, Partial, PartialAck, PartialError
from compression.protocol import GlobalMeta, ProtocolError, check_id
from coordinator.engine import Accepted
from coordinator.errors import ConfigError, Rejection
from coordinator.strategies import BaseStrategy, BufferView

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SiteConfig:
    """``[site]``: set ``id`` to run this coordinator as a site aggregator of a root."""

    id: str = ""
    """This site's id, as enrolled at the root ("" = not a site: a root, or a single coordinator)."""
    root_public_key: str = ""
    """The root's fleet key (hex): it signs the global versions and the acks of partials."""
    signing_key: str = ""
    """The Ed25519 private key (PEM) the root enrolled this site with (`fedge-coordinator enroll <site>`)."""
    partial_max_updates: int = 1000
    """A partial is forwarded once this many accepted updates wait."""
    partial_every_s: float = 5.0
    """... or once the oldest of them waited this long."""
    resend_s: float = 15.0
    """An unacknowledged partial is resent after this long."""
    max_unacked: int = 64
    """Partials waiting for the root's ack before the site stops making new ones."""

    @property
    def enabled(self) -> bool:
        return bool(self.id)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        try:
            check_id(self.id, "site.id")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if not _HEX64.fullmatch(self.root_public_key):
            raise ConfigError("site.root_public_key must be the root's fleet key: 64 lowercase hex digits")
        if not self.signing_key:
            raise ConfigError("site.signing_key must name the key the root enrolled this site with")
        if not 1 <= self.partial_max_updates <= 100_000:
            raise ConfigError(f"site.partial_max_updates must be in 1..100000, got {self.partial_max_updates}")
        if not 0.1 <= self.partial_every_s <= 3600 or not 1 <= self.resend_s <= 3600:
            raise ConfigError("site.partial_every_s must be in 0.1..3600 s and site.resend_s in 1..3600 s")
        if not 1 <= self.max_unacked <= 10_000:
            raise ConfigError(f"site.max_unacked must be in 1..10000, got {self.max_unacked}")


class HoldStrategy(BaseStrategy):
    """A site's strategy: updates wait in the buffer until they leave it in a partial."""

    def __init__(self) -> None:
        pass

    def closes(self, view: BufferView) -> bool:
        return False


def load_signing_key(path: str) -> Ed25519PrivateKey:
    try:
        return load_private_key(path, "site.signing_key")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def weighted_sums(members: Sequence[Accepted], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``sum(num_samples * delta)`` over ``members``, in float64 (sparse deltas added in place)."""
    acc = {k: np.zeros(int(np.prod(s)), dtype=np.float64) for k, s in shapes.items()}
    for u in members:
        n = float(u.num_samples)
        for name, t in u.delta.items():
            flat = acc[name]
            if isinstance(t, SparseTensor) and t.indices is not None:
                flat[t.indices] += n * t.values.astype(np.float64)  # indices are unique within a tensor
            else:
                dense = t.to_dense() if isinstance(t, SparseTensor) else np.asarray(t)
                flat += n * dense.reshape(-1).astype(np.float64)
    return {k: v.reshape(shapes[k]) for k, v in acc.items()}


class Site:
    """The site half of a coordinator in site mode; the service calls it from its worker."""

    def __init__(self, svc: CoordinatorService) -> None:
        self.svc = svc
        self.cfg = svc.cfg.site
        self.fleet = svc.cfg.fleet
        self.verify = ed25519_verifier(bytes.fromhex(self.cfg.root_public_key))
        self.follower = Follower(max_bytes=svc.cfg.limits.max_update_bytes * 8)
        followed = json.loads(svc.store.get_meta("site_followed") or "null")
        if (
            isinstance(followed, dict)
            and followed.get("version") == svc.version
            and followed.get("state_sha256") == state_digest(svc.state)
        ):
            self.follower.version, self.follower.tensors = svc.version, dict(svc.state)  # resume the chain of deltas
        self.sent: dict[int, float] = {}
        """Unacknowledged partials: seq -> when last published (monotonic); 0 = not since this start."""
        self.tries: dict[int, int] = {}
        """Publishes of each unacknowledged partial since this start (the resend interval doubles with each)."""
        self.bridge_up: bool | None = None
        """The bridge's state, from the site broker's own notification (None: not heard)."""
        for (seq,) in svc.store.db.execute("SELECT seq FROM site_partials WHERE acked IS NULL ORDER BY seq"):
            self.sent[int(seq)] = 0.0
        self.since: float | None = None
        self.root_version: int | None = None
        self.forwarded = 0
        self.problems = 0

    def mark(self) -> tuple[Any, ...]:
        """What handling a message may change here (with the service's own mark): the follower and the resend state."""
        return self.follower.mark(), dict(self.sent), dict(self.tries), self.bridge_up, self.root_version

    def restore(self, mark: tuple[Any, ...]) -> None:
        follower, sent, tries, self.bridge_up, self.root_version = mark
        self.follower.restore(follower)
        self.sent, self.tries = dict(sent), dict(tries)

    # -- what comes down the bridge ------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> bool:
        """A message from the root's side, in the batch's transaction; False if ``topic`` is not one."""
        f = self.fleet
        try:
            if topic == protocol.global_meta(f):
                if payload:
                    self.follower.add_meta(GlobalMeta.from_json(payload, self.verify))
            elif topic == protocol.global_delta(f):
                self.follower.add_delta(payload)
            elif topic == protocol.global_snapshot(f):
                self.follower.add_snapshot(payload)
            elif topic == protocol.site_bridge(f, self.cfg.id):
                self._bridge(payload)
                return True
            elif topic == protocol.site_ack(f, self.cfg.id):
                if payload:
                    self._acked(PartialAck.decode(payload, self.verify))
                return True
            else:
                return False
        except (ProtocolError, CodecError) as exc:
            self.problems += 1
            log.warning("refused a message from the root on %s: %s", topic, exc)
            return True
        self._follow()
        return True

    def _follow(self) -> None:
        svc = self.svc
        res = self.follower.follow(self._vet)
        for problem in res.problems:
            log.warning("following the root: %s", problem)
        if not res.moved or res.version is None:
            return
        v, tensors = res.version, self.follower.tensors
        db = svc.store.db
        db.execute("DELETE FROM versions WHERE version >= ?", (v,))  # a copy taken again (the root is the source)
        svc.store.commit_version(v, tensors, None, svc.cfg.keep_versions)
        svc.store.set_meta("site_followed", json.dumps({"version": v, "state_sha256": state_digest(tensors)}))
        svc.versions.state, svc.versions.version = dict(tensors), v
        svc.engine.version = v
        svc.metrics.version.set(v)
        how = "snapshot" if res.via_snapshot else f"{res.deltas_applied} delta(s)"
        log.info("following the root: v%d (%s)", v, how)

    def _bridge(self, payload: bytes) -> None:
        up = protocol.bridge_state(payload)
        if up is None or up == self.bridge_up:
            return
        self.bridge_up = up
        log.warning("the bridge to the root is %s", "up: resending what waits for an ack" if up else "down: partials wait")
        if up:  # everything unacknowledged goes again now, with a fresh backoff
            self.sent = dict.fromkeys(self.sent, 0.0)
            self.tries.clear()

    def _vet(self, meta: GlobalMeta, tensors: dict[str, np.ndarray]) -> None:
        if meta.model != self.svc.spec.to_dict():
            raise ProtocolError(
                f"the root's v{meta.version} is for another model ({meta.model}); this site serves {self.svc.spec.to_dict()}"
            )
        if {k: tuple(t.shape) for k, t in tensors.items()} != self.svc.shapes:
            raise ProtocolError(f"the root's v{meta.version} has other tensors than this site's")

    def _acked(self, ack: PartialAck) -> None:
        if ack.site != self.cfg.id:
            raise PartialError(f"an ack for site {ack.site!r} came on {self.cfg.id}'s topic")
        m = re.fullmatch(re.escape(self.cfg.id) + r"-(\d{12})", ack.partial_id)
        if m is None:
            raise PartialError(f"the ack names {ack.partial_id!r}, which is not a partial of this site")
        seq = int(m.group(1))
        cur = self.svc.store.db.execute(
            "UPDATE site_partials SET acked=?, payload=NULL, root_version=? WHERE seq=? AND acked IS NULL", (time.time(), ack.version, seq)
        )
        self.root_version = max(self.root_version or 0, ack.version)
        if cur.rowcount:
            self.sent.pop(seq, None)
            self.tries.pop(seq, None)
            log.info("root acknowledged %s (%s, v%d)", ack.partial_id, ack.outcome, ack.version)

    # -- admission ---------------------------------------------------------------------

    def admit(self) -> None:
        """Refuse an update while the root cannot be reached and the buffer is full."""
        if len(self.sent) >= self.cfg.max_unacked and len(self.svc.engine.buffer) >= self.cfg.partial_max_updates:
            raise Rejection(
                "backlog", f"{len(self.sent)} partials wait for the root's ack and the buffer is full; send this update again later"
            )

    # -- forwarding --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Between batches: forward a partial when one is due, and resend what the root has not acked."""
        svc = self.svc
        if not svc.engine.buffer:
            self.since = None
        else:
            self.since = self.since if self.since is not None else now
            due = len(svc.engine.buffer) >= self.cfg.partial_max_updates or now - self.since >= self.cfg.partial_every_s
            if due and len(self.sent) < self.cfg.max_unacked and svc.link.connected.is_set():
                self._forward(now)
        if self.bridge_up is False:
            return  # the site broker queues for the bridge; resending now only fills that queue
        for seq, at in list(self.sent.items()):
            wait = self.cfg.resend_s * 2 ** min(4, max(0, self.tries.get(seq, 1) - 1))
            if at == 0.0 or now - at >= wait:
                self._publish(seq, now, resend=at != 0.0)

    def _forward(self, now: float) -> None:
        from coordinator.service import STORAGE_ERRORS

        svc = self.svc
        members = sorted(svc.engine.buffer, key=lambda u: u.base_version)[: self.cfg.partial_max_updates]
        bases = sorted({u.base_version for u in members})[-MAX_GROUPS:]
        members = [u for u in members if u.base_version >= bases[0]]
        mark = svc._mark()
        try:
            with svc.store.batch():
                seq = int(svc.store.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM site_partials").fetchone()[0])
                by_base: dict[int, list[Accepted]] = {}
                for u in members:
                    by_base.setdefault(u.base_version, []).append(u)
                groups = []
                for base, group in sorted(by_base.items()):
                    frame = compress_dense({k: v.astype(np.float32) for k, v in weighted_sums(group, svc.shapes).items()}, FrameKind.UPDATE)
                    ids = tuple(u.update_id for u in group)
                    groups.append(Group(base, float(sum(u.num_samples for u in group)), len(group), ids, frame))
                partial = Partial(self.cfg.id, seq, time.time(), tuple(groups))
                payload = partial.encode(svc._signer)
                db = svc.store.db
                db.execute(
                    "INSERT INTO site_partials(seq, partial_id, created, updates, groups, bytes, payload) VALUES (?,?,?,?,?,?,?)",
                    (seq, partial.partial_id, partial.created, partial.updates, len(groups), len(payload), payload),
                )
                entries = [u.ref.entry for u in members]
                svc.store.record_ledger(
                    [replace(e, staleness=svc.version - e.base_version, weight=float(e.num_samples)) for e in entries], svc.version
                )
                db.executemany(
                    "INSERT INTO partial_updates(update_id, partial_id) VALUES (?,?)", [(e.update_id, partial.partial_id) for e in entries]
                )
                ids_out = {u.update_id for u in members}
                svc.engine.buffer = [u for u in svc.engine.buffer if u.update_id not in ids_out]
        except STORAGE_ERRORS as exc:
            svc._restore(mark)
            log.error("storage error while making a partial; the updates wait: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the site; the updates wait in the buffer
            svc._restore(mark)
            log.exception("making a partial failed; the updates wait: %s", exc)
            self.since = now + 10 * self.cfg.partial_every_s  # do not retry at every turn
            return
        svc.outcomes.counts["accepted"] += len(members)
        svc.metrics.applied.inc(len(members))
        self.forwarded += 1
        self.since = now if svc.engine.buffer else None
        self.sent[seq] = 0.0
        log.info("partial %s: %d update(s) in %d group(s), %d B", partial.partial_id, partial.updates, len(groups), len(payload))
        self._publish(seq, now, resend=False, payload=payload)

    def _publish(self, seq: int, now: float, *, resend: bool, payload: bytes | None = None) -> None:
        if payload is None:
            row = self.svc.store.db.execute("SELECT payload FROM site_partials WHERE seq=? AND acked IS NULL", (seq,)).fetchone()
            if row is None or row[0] is None:
                self.sent.pop(seq, None)
                return
            payload = bytes(row[0])
        if not self.svc.link.connected.is_set():
            return
        self.svc.link.client.publish(protocol.site_partial(self.fleet, self.cfg.id), payload, qos=1)
        self.tries[seq] = self.tries.get(seq, 0) + 1
        if resend:
            log.info("resent partial %s-%012d (try %d): no ack from the root yet", self.cfg.id, seq, self.tries[seq])
        self.sent[seq] = now

    # -- what the service shows --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        oldest = min(self.sent, default=None)
        return {
            "site": self.cfg.id,
            "partials_unacked": len(self.sent),
            "oldest_unacked_seq": oldest,
            "partials_forwarded": self.forwarded,
            "root_version": self.root_version,
            "following": self.follower.version,
            "bridge": {True: "up", False: "down", None: "unknown"}[self.bridge_up],
            "devices_online": self.svc.presence.count,
        }


def open_site(svc: CoordinatorService) -> Site | None:
    return Site(svc) if svc.cfg.site.enabled else None
