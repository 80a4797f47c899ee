"""The agent's main loop: follow the global model, train locally, send compressed updates.

One thread does all the work. The MQTT network thread only fills ``transport.inbox``.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from compression import CodecError, compress_update, protocol
from compression.follower import Follower
from compression.invitations import Invitations
from compression.protocol import EMBED_DELTA, CohortInvite, GlobalMeta, TrainableSpec, UpdateAck, UpdateHeader
from edge_agent import model as model_lib
from edge_agent.config import AgentConfig, model_cache_dir
from edge_agent.data import LocalData, build_blocks, describe, read_corpus, token_ids
from edge_agent.errors import ConfigError, TransportError
from edge_agent.memory import peak_rss_mb, release_free_memory
from edge_agent.outbox import Outbox
from edge_agent.personal import PersonalAdapter
from edge_agent.privacy import dpsgd_epsilon, local_epsilon, privatize
from edge_agent.schedule import OwnLoad, blocked_reason
from edge_agent.sdnotify import Notifier
from edge_agent.secure import SecureCohorts
from edge_agent.state import AgentState, write_status
from edge_agent.train import evaluate, train_round
from edge_agent.transport import AgentTransport, Inbound

log = logging.getLogger(__name__)


def load_signer(path: str) -> Callable[[bytes], bytes]:
    """The device's Ed25519 signing function, from the PEM that enrolment wrote."""
    from compression.keys import load_private_key

    try:
        return load_private_key(path, "signing_key").sign
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def fleet_verifier(public_hex: str) -> protocol.Verifier:
    """``(signature, message) -> valid`` for the fleet key's public half."""
    from compression.keys import ed25519_verifier

    return ed25519_verifier(bytes.fromhex(public_hex))


def _adapters(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The LoRA adapters of a global state (without a mixed fleet's embedding table)."""
    return {k: v for k, v in tensors.items() if k != EMBED_DELTA}


class GlobalRefused(Exception):
    """A validly signed global version this device cannot train (its spec): it waits for another."""


QUARANTINE_FILES = 20
"""Global messages whose handling failed, kept in ``<state_dir>/quarantine`` (oldest dropped)."""

STOP_DRAIN_S = 5.0
"""How long a stopping agent waits for the coordinator to confirm its pending updates."""


@dataclass
class GlobalModel:
    """The newest global version whose meta and snapshot agree."""

    version: int
    tensors: dict[str, np.ndarray]
    spec: TrainableSpec


@dataclass
class Counters:
    rounds: int = 0
    updates_sent: int = 0
    bytes_up: int = 0
    dense_bytes_up: int = 0
    bytes_down_delta: int = 0
    bytes_down_snapshot: int = 0
    eval_loss: float | None = None
    eval_loss_first: float | None = None
    eval_loss_base: float | None = None
    """Held-out loss of the frozen base alone, before any adapter: the 'before' of every run."""
    train_loss: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


class Agent:
    """A device agent. ``run()`` blocks until ``stop()`` or ``max_rounds``."""

    def __init__(self, cfg: AgentConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier(environ={})
        self.state = AgentState(cfg.state_dir)
        self._feedback = self.state.load_feedback()
        self._signer = load_signer(cfg.signing_key) if cfg.signing_key else None
        self._verify = fleet_verifier(cfg.fleet_public_key) if cfg.fleet_public_key else None
        # Acks, invitations and secure aggregation come from the coordinator the device talks to: in a site, its aggregator.
        self._verify_coord = fleet_verifier(cfg.site_public_key) if cfg.site_public_key else self._verify
        if self._verify is None:
            log.warning("LAB MODE: no fleet_public_key, so unsigned global state is accepted; never run a real device like this")
        self.transport = AgentTransport(cfg)
        self.outbox = Outbox(self.state, self.transport, protocol.device_update(cfg.fleet, cfg.device_id), cfg.ack_timeout_s)
        self.refused_messages = 0
        self._refused_version = -1
        self._adopted = 0  # global versions adopted since start (train.eval_every counts them)
        self._own_load = OwnLoad(time.monotonic())
        self._scored_version: int | None = None
        self._refused_reason: str | None = None
        self.stop_event = threading.Event()
        self.paused = False
        self.counters = Counters()
        self.global_model: GlobalModel | None = None
        # Metas, deltas and the snapshot wait here while training; it decides what to apply.
        self.follower = Follower(max_bytes=cfg.broker.max_global_bytes)
        self.invitations = Invitations(cfg.device_id)
        self.secure = SecureCohorts(cfg.fleet, cfg.device_id, self._signer, self._verify_coord, self.transport.publish)
        self._model: torch.nn.Module | None = None
        self._spec: TrainableSpec | None = None
        self._data: LocalData | None = None
        self._base_sha256 = ""
        self._personal = PersonalAdapter(cfg.state_dir, cfg.train) if cfg.train.personal != "off" else None
        self._personal_due = False
        self._state_name = "starting"
        self._blocked: str | None = None
        self.pending_count = len(self.state.pending())
        self._last_heartbeat = 0.0
        device_key = int.from_bytes(hashlib.sha256(cfg.device_id.encode()).digest()[:4], "little")
        self._rng = np.random.default_rng([cfg.train.seed, device_key])
        # Its own stream: what the fleet receives is the same whether a personal adapter trains or not.
        self._personal_rng = np.random.default_rng([cfg.train.seed, device_key, 1])
        self._process = psutil.Process()

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def prepare(self) -> None:
        """Load data and the frozen base; cheap checks first so that bad configs fail fast."""
        torch.set_num_threads(self.cfg.train.threads)
        corpus = read_corpus(self.cfg.data_dir)
        t0 = time.monotonic()
        cache = model_cache_dir(self.cfg)
        runtime = self.cfg.model.runtime if self.cfg.train.tier == "lora" else "transformers"
        self._model, tokenizer = model_lib.load_base(self.cfg.model.source, self.cfg.model.quantize, cache, runtime=runtime)
        kind = "lean" if model_lib.lean_model(self._model) is not None else "transformers"
        log.info("loaded base %s (%s, %s runtime) in %.1fs", self.cfg.model.source, self.cfg.model.quantize, kind, time.monotonic() - t0)
        self._base_sha256 = model_lib.source_sha256(self.cfg.model.source) or ""
        log.info("base content sha256 %s", self._base_sha256 or "none (no weight files to hash)")
        self._data = build_blocks(corpus, tokenizer, self.cfg.train.seq_len, self.cfg.train.heldout_fraction, self.cfg.train.seed)
        # Training needs only the token blocks: the tokenizer (about 30 MB for SmolLM2's) and the
        # corpus's text go before the first step, and their heap pages go back to the OS.
        skipped = sum(corpus.skipped.values())
        del tokenizer, corpus
        release_free_memory()
        log.info("local data: %d files; %s", self._data.num_files, describe(self._data))
        if skipped:
            self.counters.extra["data_skipped"] = skipped
            log.warning("local data: %d malformed records or files skipped (see the warnings above)", skipped)
        self.counters.eval_loss_base = self._evaluate()
        log.info("held-out loss of the base model: %.4f", self.counters.eval_loss_base)

    def _evaluate(self) -> float:
        assert self._model is not None and self._data is not None
        t = self.cfg.train
        return evaluate(self._model, self._data, t.eval_blocks, t.batch_size, t.loss_chunk_tokens)

    def run(self) -> None:
        if self._model is None:
            self.notifier.status("loading the model and local data")
            self.prepare()
        self.transport.start()
        self.notifier.ready(f"connecting to {self.cfg.broker.host}:{self.cfg.broker.port}")
        self._set_state("waiting")
        try:
            self._flush_outbox()
            while not self.stop_event.is_set():
                if self.cfg.max_rounds and self.counters.rounds >= self.cfg.max_rounds and not self.secure.busy(time.monotonic()):
                    break  # (a securely aggregated round is over once this device has answered its unmasking)
                self._pump(timeout=0.5)
                if self.pending_count and self.transport.connected.is_set():
                    self._flush_outbox()  # updates made while offline, once the broker is back
                if self.global_model is None or self.paused:
                    self._set_state("paused" if self.paused else "waiting")
                    self._score_while_idle()  # (nothing to score before the first version)
                    continue
                if (why := self._uninvited()) is not None:
                    self._wait_reason(why)
                    self._score_while_idle()
                    continue
                if self.pending_count >= self.cfg.max_outbox:
                    self._flush_outbox()
                    self._wait_reason("outbox full: waiting for the broker")
                    continue
                reason = blocked_reason(self.cfg.schedule, own_load=self._own_load.sample(time.monotonic()))
                if reason is not None:
                    self._wait_reason(reason)
                    self._score_while_idle()
                    self.stop_event.wait(5.0)
                    continue
                self._blocked = None
                self._round()
        finally:
            self.notifier.stopping("stopping: finishing the current step")
            self._drain(STOP_DRAIN_S)
            final = self._status("offline")
            self.transport.stop(final)

    def _drain(self, seconds: float) -> None:
        """On the way out, give the coordinator a moment to confirm what is still pending
        (what it does not confirm stays in the outbox for the next start)."""
        deadline = time.monotonic() + seconds
        while self.pending_count and self.transport.connected.is_set() and time.monotonic() < deadline:
            self._flush_outbox()
            try:
                self._handle(self.transport.inbox.get(timeout=0.1))
            except queue.Empty:
                continue

    def _wait_reason(self, reason: str) -> None:
        if reason != self._blocked:
            log.info("not training: %s", reason)
            self._blocked = reason
            self._set_state("idle", force=True)

    def _uninvited(self) -> str | None:
        """Why this device may not train now because the fleet trains in cohorts (None: it may)."""
        if not self._in_cohorts():
            return None
        invite = self.invitations.current(time.monotonic())
        if invite is None:
            return "waiting for a cohort invitation"
        assert self.global_model is not None
        if self.global_model.version < invite.version:
            return f"cohort {invite.cohort}: waiting for v{invite.version}"
        if invite.secagg is not None and not self.secure.ready(invite.cohort):
            return f"cohort {invite.cohort}: secure aggregation's key exchange"
        return None

    def _in_cohorts(self) -> bool:
        """Whether the fleet trains in cohorts: the meta of the version this device holds says so."""
        meta = self.follower.meta
        return meta is not None and meta.cohorts

    # -- the round -------------------------------------------------------------------

    def _round(self) -> None:
        assert self.global_model is not None and self._model is not None and self._data is not None
        g = self.global_model
        base = g.version
        self._set_state("training")

        def should_stop() -> bool:
            self.notifier.alive()
            return self.stop_event.is_set()

        sgd = self.cfg.privacy.sgd
        result = train_round(self._model, self._data, self.cfg.train, self._rng, should_stop=should_stop, dp_sgd=sgd)
        if result.steps == 0:
            return
        if sgd.enabled:
            self.state.count_dpsgd(result.steps)  # counted before anything trained with them leaves
        delta = model_lib.round_delta(self._model, g.tensors, self.cfg.train.tier)
        held = self.invitations.held
        if held is not None and held.invite.secagg is not None and self._in_cohorts():
            if self.cfg.privacy.mechanism != "none":  # local DP applies to what leaves, masked or not
                self.state.next_seq(dp_round=True)
                delta = privatize(delta, self.cfg.privacy, self._rng)
            try:
                self.secure.submit(self.invitations.used(), delta, self._rng)  # masked: never in the clear
            except (CodecError, TransportError) as exc:  # the cohort counts this device a dropout; the agent goes on
                log.warning("cohort %s: the masked update could not be sent: %s", held.invite.cohort, exc)
            self.counters.rounds += 1
            log.info(
                "round %d (on v%d): %d steps in %.1fs (%.2f s/step), loss %.4f, masked for cohort %s",
                base + 1,
                base,
                result.steps,
                result.seconds,
                result.seconds / result.steps,
                result.train_loss,
                held.invite.cohort,
            )
            self._set_state("idle")
            return
        ldp = self.cfg.privacy.mechanism != "none"
        seq = self.state.next_seq(dp_round=ldp)  # counted before anything noised exists
        cohort = self.invitations.used() if self._in_cohorts() else ""
        if ldp:
            delta = privatize(delta, self.cfg.privacy, self._rng)
        compressed = compress_update(delta, self.cfg.codec, self._feedback, phase=base)
        header = UpdateHeader(
            device=self.cfg.device_id,
            seq=seq,
            update_id=f"{self.cfg.device_id}-{seq}-{uuid.uuid4().hex[:8]}",
            base_version=base,
            num_samples=result.samples if self.cfg.train.sample_weight == "steps" else len(self._data.train),
            timestamp=time.time(),
            frame_sha256=hashlib.sha256(compressed.frame).hexdigest(),
            train_loss=result.train_loss if np.isfinite(result.train_loss) else None,
            cohort=cohort,
            base_sha256=self._base_sha256,
        )
        envelope = protocol.encode_envelope(header, compressed.frame, signer=self._signer)
        # One durable commit of the update and of the residual after it (see edge_agent.state).
        self.state.commit_round(seq, envelope, compressed.feedback)
        self._feedback = compressed.feedback
        self.pending_count = len(self.state.pending())
        release_free_memory()
        c = self.counters
        c.rounds += 1
        c.train_loss = header.train_loss
        c.extra.update(step_s=result.seconds / result.steps, frame_bytes=len(compressed.frame))
        c.dense_bytes_up += compressed.dense_fp32_bytes
        self._flush_outbox()
        # The coordinator's numbering: round N builds version N from updates on version N-1.
        log.info(
            "round %d (on v%d): %d steps in %.1fs (%.2f s/step), loss %.4f, update %d B (dense %d B); %d rounds since start",
            base + 1,
            base,
            result.steps,
            result.seconds,
            result.seconds / result.steps,
            result.train_loss,
            len(envelope),
            compressed.dense_fp32_bytes,
            c.rounds,
        )
        self._personal_due = self._personal is not None  # trained on the next version adopted
        self._set_state("idle")
        # Wait for the version that includes this update, then restart from it. If it does
        # not come in time, restart from the same global: the residual keeps what was unsent.
        deadline = time.monotonic() + self.cfg.sync_wait_s
        while not self.stop_event.is_set() and self.global_model.version == base and time.monotonic() < deadline:
            self._pump(timeout=0.2)
        if self.global_model.version == base:
            model_lib.load_global(self._model, g.tensors)

    def _flush_outbox(self) -> None:
        """Send the oldest update that the coordinator has not confirmed yet (see edge_agent.outbox)."""
        self.outbox.flush()
        self.pending_count = self.outbox.pending_count()
        self.counters.updates_sent = self.outbox.sent
        self.counters.bytes_up = self.outbox.bytes_sent

    # -- inbound messages ------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        """Handle inbound messages for up to ``timeout`` seconds, and heartbeat."""
        self.notifier.alive()
        try:
            msg = self.transport.inbox.get(timeout=timeout)
        except queue.Empty:
            msg = None
        while msg is not None:
            self._handle(msg)
            try:
                msg = self.transport.inbox.get_nowait()
            except queue.Empty:
                msg = None
        self._try_adopt_global()
        if time.monotonic() - self._last_heartbeat >= self.cfg.heartbeat_s:
            self._set_state(self._state_name, force=True)

    def _handle(self, msg: Inbound) -> None:
        """Take one inbound message. Nothing a message holds can stop the agent: a bad one is
        refused, counted and (when its handling raised) quarantined."""
        try:
            self._take(msg)
        except CodecError as exc:
            self.refused_messages += 1
            log.warning("refused a message on %s: %s", msg.topic, exc)
        except Exception as exc:  # noqa: BLE001 - a message's failure is the message's, never the agent's
            self._quarantine(msg.topic, msg.payload, exc)

    def _quarantine(self, topic: str, payload: bytes, exc: BaseException) -> None:
        self.refused_messages += 1
        log.error("a message on %s could not be handled (%s: %s); kept in quarantine/", topic, type(exc).__name__, exc)
        qdir = self.state.root / "quarantine"
        try:
            qdir.mkdir(exist_ok=True)
            name = f"{time.time_ns():020d}-{hashlib.sha256(payload).hexdigest()[:16]}"
            (qdir / f"{name}.bin").write_bytes(payload[: self.cfg.broker.max_global_bytes])
            (qdir / f"{name}.txt").write_text(f"{topic}\n{type(exc).__name__}: {exc}\n")
            for old in sorted(qdir.glob("*.bin"))[:-QUARANTINE_FILES]:
                old.unlink(missing_ok=True)
                old.with_suffix(".txt").unlink(missing_ok=True)
        except OSError as err:
            log.error("cannot write quarantine/: %s", err)

    def _take(self, msg: Inbound) -> None:
        fleet, dev = self.cfg.fleet, self.cfg.device_id
        if msg.topic == protocol.global_meta(fleet):
            self.follower.add_meta(GlobalMeta.from_json(msg.payload, self._verify))
        elif msg.topic == protocol.global_delta(fleet):
            self.follower.add_delta(msg.payload)
            self.counters.bytes_down_delta += len(msg.payload)
        elif msg.topic == protocol.global_snapshot(fleet):
            self.follower.add_snapshot(msg.payload)
            self.counters.bytes_down_snapshot += len(msg.payload)
        elif msg.topic == protocol.device_ack(fleet, dev):
            if not msg.payload:
                return  # a cleared retained ack
            ack = UpdateAck.from_json(msg.payload, self._verify_coord)
            if ack.device != dev:
                raise protocol.ProtocolError(f"ack names device {ack.device!r}, not this one")
            if self.outbox.on_ack(ack):
                self._flush_outbox()  # the next update, if one waits
        elif msg.topic.startswith(f"fl/{fleet}/cohorts/") and "/secagg/" in msg.topic:
            self.secure.take(msg.topic, msg.payload)
        elif msg.topic.startswith(f"fl/{fleet}/cohorts/"):
            invite = CohortInvite.from_json(msg.payload, self._verify_coord)
            if msg.topic != protocol.cohort_invite(fleet, invite.cohort, dev):
                raise protocol.ProtocolError(f"an invitation to {invite.device} for {invite.cohort} came on {msg.topic}")
            ignored = self.invitations.offer(invite, time.monotonic(), time.time())
            if ignored:
                log.info("invitation ignored: %s", ignored)
            else:
                log.info("invited to cohort %s on v%d%s", invite.cohort, invite.version, " (secure aggregation)" if invite.secagg else "")
                if invite.secagg is not None:
                    self.secure.invited(invite, time.monotonic())
        elif msg.topic == protocol.device_cmd(fleet, dev):
            command = protocol.decode_command(msg.payload)
            self.paused = command == "pause"
            log.info("command %s", command)
            self._set_state("paused" if self.paused else "idle", force=True)

    def _try_adopt_global(self) -> None:
        """Move to the newest global version; a version this device cannot take is refused, and it waits."""
        latest = self.follower.latest
        if latest is None or latest.version <= self._refused_version:
            return
        try:
            self._adopt_latest(latest)
        except GlobalRefused as exc:
            self._refuse_version(latest, str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a global version does, the agent stays up
            self._quarantine(protocol.global_meta(self.cfg.fleet), latest.to_json(), exc)
            self._refuse_version(latest, f"{type(exc).__name__}: {exc}")

    def _refuse_version(self, meta: GlobalMeta, reason: str) -> None:
        self._refused_version = meta.version
        self._refused_reason = f"global v{meta.version} refused: {reason}"
        log.error("%s; waiting for a version this device can train", self._refused_reason)
        self.follower.forget(meta.version)
        self._set_state(self._state_name, force=True)

    def _adopt_latest(self, latest: GlobalMeta) -> None:
        current = self.global_model.version if self.global_model else -1
        if latest.version <= current:
            return
        result = self.follower.follow(vet=self._vet_snapshot)
        for problem in result.problems:
            log.warning("%s", problem)
        self.transport.want_snapshot(result.behind)
        if result.moved:
            assert self._spec is not None and result.version is not None
            self.global_model = GlobalModel(result.version, self.follower.tensors, self._spec)
            self._refused_reason = None
            self._after_adopt()

    def _vet_snapshot(self, meta: GlobalMeta, tensors: dict[str, np.ndarray]) -> None:
        """Before a snapshot is taken: this device must be able to train the fleet's spec (raises GlobalRefused)."""
        try:
            spec = TrainableSpec.from_dict(meta.model)
        except CodecError as exc:
            raise GlobalRefused(f"unreadable trainable spec: {exc}") from None
        assert self._model is not None
        if spec.base_sha256 and self._base_sha256 and spec.base_sha256 != self._base_sha256:
            raise GlobalRefused(
                f"the fleet trains base sha256 {spec.base_sha256}, but this device loaded {self.cfg.model.source} "
                f"with sha256 {self._base_sha256}: another base (of the same shape, or the shape check would say so)"
            )
        if spec.r > self.cfg.train.max_lora_r:
            raise GlobalRefused(f"the fleet trains LoRA rank {spec.r}, above this device's train.max_lora_r={self.cfg.train.max_lora_r}")
        if self._spec is None:
            assert self._data is not None
            rows = np.unique(token_ids(self._data.train)) if self.cfg.train.tier == "embedding" else None
            try:
                self._model = model_lib.attach_trainable(self._model, spec, self.cfg.train.tier, rows=rows, seed=self.cfg.train.seed)
            except model_lib.LeanUnsupported:
                if self.cfg.model.runtime != "auto":
                    raise
                log.info("the fleet trains an embedding table, which the lean runtime does not carry: reloading with transformers")
                cache = model_cache_dir(self.cfg)
                self._model, _ = model_lib.load_base(self.cfg.model.source, self.cfg.model.quantize, cache, runtime="transformers")
                self._model = model_lib.attach_trainable(self._model, spec, self.cfg.train.tier, rows=rows, seed=self.cfg.train.seed)
            self._spec = spec
        elif spec != self._spec:
            raise GlobalRefused(f"the fleet's trainable spec changed from {self._spec} to {spec}; restart the agent to take it")

    def _after_adopt(self) -> None:
        assert self.global_model is not None and self._model is not None and self._data is not None
        model_lib.load_global(self._model, self.global_model.tensors)
        self._adopted += 1
        if self._personal is not None and self._personal_due:
            self._train_personal()
        every = self.cfg.train.eval_every
        if every and (self._adopted - 1) % every == 0:
            self._score()
        else:
            log.info("adopted global v%d", self.global_model.version)
        self._set_state(self._state_name if self._state_name != "waiting" else "idle", force=True)

    def _train_personal(self) -> None:
        """The personal adapter's round, on the version just adopted: once per round of this
        device's own, so a fast fleet does not multiply the cost. Its score is taken at once,
        against the same version."""
        assert self._personal is not None and self.global_model is not None and self._model is not None and self._data is not None
        self._personal_due = False
        before = self._state_name
        self._set_state("training")
        w = _adapters(self.global_model.tensors)

        def should_stop() -> bool:
            self.notifier.alive()
            return self.stop_event.is_set()

        try:
            p = self._personal.train(self._model, self._data, w, self._personal_rng, should_stop)
            loss = self._personal.evaluate(self._model, self._data, w)
        except Exception as exc:  # noqa: BLE001 - the personal adapter failing never refuses the fleet's version
            log.error(
                "personal adapter: its round on v%d failed (%s: %s); the fleet's training goes on",
                self.global_model.version,
                type(exc).__name__,
                exc,
            )
            model_lib.load_global(self._model, self.global_model.tensors)
            self._set_state(before)
            return
        if loss is not None:
            self.counters.extra.update(eval_loss_personal=loss, eval_personal_version=self.global_model.version)
        log.info(
            "personal adapter on v%d: %d steps in %.1fs, held-out loss %s (it stays on this device)",
            self.global_model.version,
            p.steps,
            p.seconds,
            f"{loss:.4f}" if loss is not None else "-",
        )
        self._set_state(before)

    def _score(self) -> None:
        """Evaluate the version held on the fixed held-out blocks (train.eval_blocks), and report it."""
        assert self.global_model is not None
        t0 = time.monotonic()
        loss = self._evaluate()
        c = self.counters
        c.eval_loss = loss
        if c.eval_loss_first is None:
            c.eval_loss_first = loss
        self._scored_version = self.global_model.version
        c.extra["eval_s"] = time.monotonic() - t0
        c.extra["eval_version"] = self.global_model.version
        blocks, seconds = self.cfg.train.eval_blocks, c.extra["eval_s"]
        log.info("global v%d: held-out loss %.4f (%d blocks, %.1fs)", self.global_model.version, loss, blocks, seconds)

    def _score_while_idle(self) -> None:
        """Training waits: score the version held if it has no score yet (train.eval_when_idle).
        Never while a securely aggregated cohort waits for this device's unmasking answer, nor
        once the agent has done its max_rounds: then the time is not free."""
        if not self.cfg.train.eval_when_idle or self.global_model is None or self._scored_version == self.global_model.version:
            return
        if self.secure.busy(time.monotonic()) or (self.cfg.max_rounds and self.counters.rounds >= self.cfg.max_rounds):
            return
        self._score()
        self._set_state(self._state_name, force=True)

    # -- status ----------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        c = self.counters
        metrics: dict[str, float] = {
            "rss_mb": self._process.memory_info().rss / 2**20,
            "peak_rss_mb": peak_rss_mb() * 1e6 / 2**20,  # MiB, as rss_mb
            "own_load": self._own_load.value,
            "cpu_percent": self._process.cpu_percent(),
            "rounds": c.rounds,
            "updates_sent": c.updates_sent,
            "bytes_up": c.bytes_up,
            "dense_bytes_up": c.dense_bytes_up,
            "bytes_down_delta": c.bytes_down_delta,
            "bytes_down_snapshot": c.bytes_down_snapshot,
            "pending": self.pending_count,
            "reconnects": self.transport.reconnects,
            "updates_confirmed": self.outbox.confirmed,
            "updates_refused": self.outbox.refused,
            "updates_resent": self.outbox.resent,
            "messages_refused": self.refused_messages,
            **c.extra,
        }
        p = self.cfg.privacy
        if p.sgd.enabled and self._data is not None:
            s, n = p.sgd, len(self._data.train)
            metrics["dpsgd_steps"] = self.state.dpsgd_steps
            metrics["dpsgd_epsilon"] = dpsgd_epsilon(self.state.dpsgd_steps, n, self.cfg.train.batch_size, s.noise_multiplier, s.delta)
        if p.mechanism != "none":
            metrics["local_dp_rounds"] = self.state.dp_rounds
            metrics["local_epsilon"] = local_epsilon(self.state.dp_rounds, p.mechanism, p.noise_multiplier, p.epsilon_per_round, p.delta)
        for key in ("eval_loss", "eval_loss_first", "eval_loss_base", "train_loss"):
            value = getattr(c, key)
            if value is not None:
                metrics[key] = value
        version = self.global_model.version if self.global_model else None
        status = protocol.DeviceStatus(
            state=state,
            version=version,
            ts=time.time(),
            profile=self.cfg.profile,
            metrics=metrics,
            tier=self.cfg.train.tier,
            detail=(self._refused_reason or self._blocked or None) if state != "offline" else None,
        )
        return status.to_json()

    def _set_state(self, state: str, force: bool = False) -> None:
        if state == self._state_name and not force:
            return
        self._state_name = state
        self._last_heartbeat = time.monotonic()
        payload = self._status(state)
        self.transport.publish_nowait(protocol.device_status(self.cfg.fleet, self.cfg.device_id), payload, retain=True)
        version = self.global_model.version if self.global_model else None
        detail = f"; {self._blocked}" if self._blocked and state == "idle" else ""
        connected = "connected" if self.transport.connected.is_set() else "offline"
        self.notifier.status(f"{state} at v{version} ({connected}, {self.pending_count} pending){detail}")
        write_status(self.state.root, payload, blocked=self._blocked, connected=self.transport.connected.is_set())
