"""The coordinator's MQTT shell: receive, validate, aggregate, commit, acknowledge, publish.

paho callbacks only enqueue. One worker (the caller of :meth:`CoordinatorService.run`)
handles messages in order, so the global state has a single writer. Updates are
acknowledged to the broker (``manual_ack``) only after they are durably committed or
durably rejected; the broker keeps unacknowledged messages in the coordinator's
persistent session and redelivers them after a crash.

No message can take the service down. Each one is handled inside a savepoint of the
batch's transaction: if its handling raises, its writes and in-memory effects are undone,
it is refused as ``handler_error`` (counted), its payload is quarantined, and it is
acknowledged, so that the broker never redelivers a poison message forever. A storage
fault (a full disk, a damaged database) is not the message's fault: the batch is rolled
back, nothing is acknowledged, and the batch is retried with a growing delay.

Every update the coordinator processes gets an end-to-end ack: a retained, fleet-signed
message on ``fl/<fleet>/devices/<id>/ack`` naming the update and its outcome, published
after the commit. Agents keep an update until its ack arrives, so an update the broker
loses (a kill -9 between autosaves, a hijacked session) is resent, never lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from typing import Any

import numpy as np

from compression import CodecError, ErrorFeedback, decode_frame, protocol
from coordinator.cohorts import open_cohorts
from coordinator.config import CoordinatorConfig
from coordinator.engine import Accepted, Engine, Step
from coordinator.errors import ConfigError, Rejection, StoreError
from coordinator.evaluation import open_evaluation
from coordinator.identity import fleet_key
from coordinator.influence import InfluenceTracker, state_norm
from coordinator.initial import open_fleet
from coordinator.intake import Intake, accepted, ledger_entry
from coordinator.link import Link, Message
from coordinator.metrics import Metrics
from coordinator.outcomes import Outcomes
from coordinator.presence import Presence
from coordinator.quarantine import Quarantine
from coordinator.root import handle_partial
from coordinator.rounds import close_round, commit_step
from coordinator.secure_apply import handle_secagg, open_secure, secure_turn
from coordinator.site import HoldStrategy, load_signing_key, open_site
from coordinator.store import BufferedUpdate, Store
from coordinator.strategies import StrategyLoadError, load_strategy
from coordinator.versions import Versions

log = logging.getLogger(__name__)

BATCH_MAX = 256
"""Queued messages handled in one transaction (one fsync), whose versions are published as one
(:meth:`~coordinator.versions.Versions.merging`). The broker's ``max_inflight_messages``
should be above it (``devices/mosquitto/mosquitto.conf``: 1,000), so that the next batch
arrives while one is committed."""
STORAGE_RETRY_MAX_S = 60.0
"""Longest wait between retries of a batch that hit a storage fault."""
STORAGE_ERRORS = (StoreError, sqlite3.Error, OSError)
"""Faults of the machine, not of a message: the batch is retried, nothing is acknowledged."""


class CoordinatorService:
    """Owns the store and the global state; call :meth:`run` to serve until ``stop()``."""

    def __init__(self, cfg: CoordinatorConfig, *, init: bool = False) -> None:
        """Open the fleet in ``cfg.state_dir``; ``init`` starts a new one there if none exists."""
        self.cfg = cfg
        self.store = Store(cfg.state_dir, create=init)
        try:
            strategy = HoldStrategy() if cfg.site.enabled else load_strategy(cfg.strategy)
        except StrategyLoadError as exc:
            self.store.close()
            raise ConfigError(str(exc)) from None
        try:
            self.spec, version, state, downlink, strategy_state = open_fleet(self.store, cfg, init)
            self.versions = Versions(cfg, self.store, state, downlink, version)
            self._signer = (load_signing_key(cfg.site.signing_key) if cfg.site.enabled else fleet_key(cfg.state_dir, create=False)).sign
            # Accepted before a restart, not yet aggregated; decoded (sparse) once, here or on arrival.
            buffered = [accepted(b, decode_frame(b.frame).tensors) for b in self.store.buffered()]
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
            self.engine = Engine(
                cfg.strategy, shapes=self.shapes, version=version, dp=cfg.dp, strategy=strategy, buffered=buffered,
                state=strategy_state, participations=self.store.participations(), now=time.monotonic(),
            )  # fmt: skip
        except CodecError as exc:
            self.store.close()
            raise StoreError(
                f"{cfg.state_dir}: a stored update or version does not decode ({exc}); run `fedge-coordinator check`"
            ) from None
        except BaseException:
            self.store.close()
            raise
        self.influence = InfluenceTracker(
            cfg.limits, self.store.recent_norms(cfg.limits.norm_window), self.store.last_samples(), state_norm(self.versions.state)
        )
        self._degraded: str | None = None
        self._strategy_error: str | None = None
        self._metrics_error: str | None = None
        self.quarantine = Quarantine(f"{cfg.state_dir}/quarantine", max_files=cfg.quarantine_max_files)
        self.intake = Intake(cfg, self.store, self.influence)
        self.presence = Presence(self.store)
        if cfg.dp.enabled:
            self.store.set_meta(
                "dp", json.dumps({"noise_multiplier": cfg.dp.noise_multiplier, "delta": cfg.dp.delta, "amplified": cfg.cohorts.enabled})
            )
        self.metrics = Metrics(cfg.fleet)
        self.site = open_site(self)
        self.secure = open_secure(self)
        self.cohorts = open_cohorts(cfg, self.store.db, self.metrics, self.secure, self.engine)
        self.outcomes = Outcomes(self.store, self.metrics, self.intake.ackable)
        self.evaluation = open_evaluation(cfg, self.store, self.spec, self.metrics)  # [eval]: scores versions in a child
        if self.evaluation is not None:
            self.evaluation.offer(self.version, self.versions.state, force=True)  # where the fleet starts (or resumes)
        self.metrics.version.set(self.version)
        self.metrics.buffered.set(len(self.buffer))
        self.metrics.epsilon_max.set(self.fleet_epsilon())
        self.metrics_port: int | None = None
        self.stop_event = threading.Event()
        self._last_status = 0.0
        try:
            self.link = Link(cfg, self._signer)
        except ConfigError:
            self.store.close()
            raise

    # The policy's state lives in the engine, the global state in `versions`; these read them.
    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.versions.state

    @property
    def downlink(self) -> ErrorFeedback:
        return self.versions.downlink

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def buffer(self) -> list[Accepted]:
        return self.engine.buffer

    @property
    def participations(self) -> dict[str, int]:
        return self.engine.participations

    def fleet_epsilon(self) -> float:
        return self.engine.fleet_epsilon()

    @property
    def counts(self) -> dict[str, int]:
        return self.outcomes.counts

    @property
    def rejections(self) -> dict[str, int]:
        return self.outcomes.rejections

    # -- serving ---------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        self.link.start()
        self.intake.decoder.start()  # ready by the first batch
        if self.cfg.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
            except OSError as exc:  # a port in use must not stop aggregation (nor make a crash loop)
                self._metrics_error = f"/metrics not served on {self.cfg.metrics_host}:{self.cfg.metrics_port}: {exc}"
                log.error("%s; serving without it", self._metrics_error)
        try:
            while not self.stop_event.is_set():
                self._serve_once()
        finally:
            self._publish_status("offline")
            if self.evaluation is not None:
                self.evaluation.close()
            self.link.close()
            self.intake.decoder.close()
            self.metrics.close()
            self.store.close()

    def _serve_once(self) -> None:
        """One turn of the worker: a batch of messages, a round check, a heartbeat."""
        batch = self.link.next_batch(BATCH_MAX, timeout=0.5)
        if "connected" in batch:
            self.link.publish_invites(self.cohorts.open_invitations())  # devices act on each one once
        if "connected" in batch and self.site is None:  # a site never publishes versions: they are the root's
            try:
                delta = self.store.delta_frame(self.version)
            except STORAGE_ERRORS as exc:
                log.error("cannot read the last delta to republish it (%s); publishing the snapshot only", exc)
                delta = None
            self.link.publish_version(self.spec, self.version, self.versions.state, *(delta or (None, None)))
        messages = [m for m in batch if isinstance(m, Message)]
        if messages:
            self._process(messages)
        if self.site is not None:
            self.site.tick(time.monotonic())
        else:
            self._maybe_close_round()
        secure_turn(self)
        if self.evaluation is not None:
            self.evaluation.poll()
        self.cohorts.tick(time.time(), self.presence.ready, self.version, self.store.batch, self.link.publish_invites)
        if time.monotonic() - self._last_status >= self.cfg.heartbeat_s:
            self._publish_status("online")

    def _process(self, messages: list[Message]) -> None:
        """Handle queued messages in one transaction (group commit), then publish, then acknowledge.

        Nothing is acknowledged or published before the commit: a crash inside the batch
        loses only unacknowledged work, which the broker redelivers. A storage fault rolls
        the batch back and retries it, with a growing delay, until it commits or the
        service stops (then the broker redelivers it to the next start).
        """
        delay = 1.0
        merge = True
        while True:
            mark = self._mark()
            self.intake.prefetch([m.payload for m in messages if m.topic.endswith("/update")], self.shapes)
            try:
                with self.store.batch(), self.versions.merging(merge):
                    for msg in messages:
                        self._handle_guarded(msg)
                break
            except Rejection as rej:  # the batch's versions, merged, would overflow: made one by one, the culprit is refused
                self._restore(mark)
                log.warning("the batch's versions, merged, are refused (%s); making them one by one", rej)
                merge = False
            except STORAGE_ERRORS as exc:
                self._restore(mark)
                self._degraded = f"storage error: {exc}"
                log.error("storage error, %d message(s) not acknowledged; retrying in %.0fs: %s", len(messages), delay, exc)
                if self.stop_event.wait(delay):
                    return
                delay = min(2 * delay, STORAGE_RETRY_MAX_S)
        self.intake.done()
        if self._degraded:
            log.info("storage works again")
            self._degraded = None
        if self.versions.pending:
            self.influence.global_norm = state_norm(self.versions.state)
        self._after_commit()
        now = time.monotonic()
        for msg in messages:
            self.link.ack(msg)
            if msg.topic.endswith("/update"):
                self.metrics.latency.observe(now - msg.received)
        self.metrics.version.set(self.version)
        self.metrics.buffered.set(len(self.buffer))
        self.metrics.devices_online.set(self.presence.count)
        if any(m.topic.endswith("/update") for m in messages):
            self._publish_status("online")

    def _after_commit(self) -> None:
        """Publish what the last commit made: new versions, then the devices' acks."""
        for v in self.versions.take_pending():
            self.link.publish_version(self.spec, v.version, v.state, v.base, v.delta_frame)
            if self.evaluation is not None:
                self.evaluation.offer(v.version, v.state)
        for ack in self.outcomes.take_acks():
            self.link.publish_ack(ack)

    # -- one message, guarded ----------------------------------------------------------

    def _mark(self) -> tuple[Any, ...]:
        """Everything a message's handling may change in memory, to undo it if the handling fails."""
        parts = (self.engine.mark(), self.versions.mark(), self.outcomes.mark(), self.influence.mark(), self.cohorts.mark())
        return (*parts, self.site.mark() if self.site is not None else None, self.store._pending_prune)

    def _restore(self, mark: tuple[Any, ...]) -> None:
        engine, versions, outcomes, influence, cohorts, site, self.store._pending_prune = mark
        if self.site is not None:
            self.site.restore(site)
        self.cohorts.restore(*cohorts)
        self.outcomes.restore(outcomes)
        self.engine.restore(engine)
        self.versions.restore(versions)
        self.influence.restore(influence)

    def _handle_guarded(self, msg: Message) -> None:
        """Handle one message in a savepoint; if it raises, undo it and refuse it, never the service."""
        mark = self._mark()
        self.store.savepoint()
        try:
            self._handle(msg)
        except STORAGE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is this message's: refuse it, count it, keep it
            self.store.rollback_to_savepoint()
            self._restore(mark)
            self._poisoned(msg, exc)
            return
        self.store.release()

    def _poisoned(self, msg: Message, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        log.error("message on %s could not be handled and is refused (%s); payload quarantined", msg.topic, error[:300])
        self.quarantine.keep(msg.topic, msg.payload, error)
        self.outcomes.handler_error(msg.topic, msg.payload, error, self.version, self.cfg.limits.max_update_bytes)

    def _handle(self, msg: Message) -> None:
        if self.site is not None and self.site.handle(msg.topic, msg.payload):
            return  # the root's versions and acks, down the bridge (coordinator.site)
        if msg.topic.startswith(f"fl/{self.cfg.fleet}/sites/"):
            return handle_partial(self, msg.topic, msg.payload)  # a site's partial aggregate (coordinator.root)
        try:
            fleet, device, leaf = protocol.parse_device_topic(msg.topic)
        except CodecError as exc:
            if msg.topic.endswith("/update"):  # an update under an id no device can have: counted, not just logged
                self.outcomes.reject(None, Rejection("malformed_topic", str(exc)))
            else:
                log.warning("ignored message on %s: %s", msg.topic, exc)
            return
        if leaf == "update":
            self._handle_update(device, msg)
        elif leaf == "status":
            self.presence.observe(device, msg.payload)
        elif leaf == "secagg":
            handle_secagg(self, device, msg.payload)

    def _handle_update(self, device: str, msg: Message) -> None:
        try:
            env = self.intake.envelope(msg.payload)
        except Rejection as rej:
            self.outcomes.reject(device, rej)
            return
        header = env.header
        if header.device == device and self.outcomes.duplicate(
            header, self.version, lambda uid: any(u.update_id == uid for u in self.buffer)
        ):
            return
        try:
            valid = self.intake.validate(device, env, len(msg.payload), self.shapes, self.version, self.spec.base_sha256)
            self.cohorts.check(device, valid.header.cohort)
            self.engine.admit(valid.header.device)
            if self.site is not None:
                self.site.admit()
        except Rejection as rej:
            self.outcomes.reject(device, rej)
            if header.device == device:
                self.outcomes.ack(header, "rejected", str(rej), self.version)
            return
        self.store.advance_seq(valid.header.device, valid.header.seq)  # replay protection, in this batch's transaction
        self.cohorts.reported(device, valid.header.cohort, time.time())
        self.metrics.accepted.inc()
        self.metrics.staleness.observe(valid.staleness)
        self.influence.observe(device, valid.norm, valid.header.num_samples)
        entry = ledger_entry(valid)
        step = self.engine.offer(accepted(BufferedUpdate(entry, valid.frame), valid.tensors), time.monotonic(), self._online_count())
        if step is None:
            self.store.add_to_buffer(entry, valid.frame)
            self.outcomes.ack(valid.header, "buffered", None, self.version)
            return
        # This update completes a version: it is never written to the buffer table.
        if not self._commit(step):
            self.outcomes.reject(device, Rejection("non_finite", "the global step is not finite"))
            self.outcomes.ack(valid.header, "rejected", "non_finite: the global step is not finite", self.version)
            return
        self.outcomes.ack(valid.header, "applied", None, self.version)

    def _online_count(self) -> int:
        return self.presence.count

    def _maybe_close_round(self) -> None:
        close_round(self)

    def _commit(self, step: Step) -> bool:
        return commit_step(self, step)

    def _publish_status(self, state: str) -> None:
        self._last_status = time.monotonic()
        extra: dict[str, object] = {"strategy": self.cfg.strategy.kind, "buffered": len(self.buffer)}
        if problem := self._degraded or self._strategy_error or self._metrics_error:
            extra["degraded"] = problem[:300]
        if self.cfg.dp.enabled:
            extra.update(dp_epsilon=round(self.fleet_epsilon(), 4), dp_delta=self.cfg.dp.delta)
        extra.update(self.cohorts.status())
        if self.evaluation is not None:
            extra.update(self.evaluation.status())
        if self.site is not None:
            extra.update(self.site.status())
        self.link.publish_status(self.outcomes.status(state, self.version, extra), wait=state == "offline")
