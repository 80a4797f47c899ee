"""Secure aggregation of cohorts: the coordinator's side of the rounds (``docs/secure-aggregation.md``).

With ``[secagg] enabled``, every cohort is securely aggregated. Its invitations carry
:class:`~compression.protocol.SecAggParams`, and its members never upload an update: they
run four rounds through the coordinator, which routes messages and learns only the sum.

1. **keys**: each member sends its two public keys. When every member has (or ``round_s``
   passed and at least ``t`` have), the coordinator sends the list U1 to each of them.
2. **shares**: each member of U1 sends its sealed shares, one per member of U1. The
   coordinator forwards to each member the shares addressed to it, from the senders U2.
3. **masked**: each member of U2 sends its masked vector of the cohort's shared
   coordinates, once trained. U3 is who sent one by the cohort's deadline minus
   ``2 * round_s`` (or all of U2, sooner), which leaves the unmasking time before the deadline.
4. **unmask**: the coordinator names the survivors U3 and the dropouts U2 - U3; each
   survivor reveals its shares of the survivors' self-mask seeds and of the dropouts' mask
   keys. With ``t`` reveals the coordinator unmasks the exact sum.

A round that ends with fewer than ``t`` members fails the cohort: nothing of it is applied,
and its members are dropouts. :class:`SecureCohort` is pure (time passed in); the
:class:`SecureRounds` shell verifies each message's signature with the sender's enrolled
key, signs its own with the fleet key, and publishes them. The rounds live in memory only:
a coordinator that restarts abandons the cohorts it had open (``Cohorts`` records them
``abandoned``), so a cohort is applied whole, in one transaction, or not at all.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from compression import protocol
from compression.protocol import SecAggParams
from compression.secagg import MAX_COHORT, Keys, Quantizer, Reveal, Sealed, SecAggError, shared_indices, unmask, unpack
from compression.secagg_wire import (
    UP_KINDS,
    SecAggMessage,
    decode,
    keys_down,
    read_keys_up,
    read_reveal,
    read_shares,
    shares_msg,
    unmask_down,
)
from coordinator.cohorts import Cohort
from coordinator.errors import Rejection
from coordinator.identity import enrolled_key
from coordinator.privacy import DPConfig

log = logging.getLogger(__name__)

MIN_MEMBERS = 3
"""A securely aggregated cohort has at least this many members: the sum of two reveals each one to the other."""


@dataclass(frozen=True)
class SecureConfig:
    """``[secagg]``: securely aggregated cohorts (see :mod:`coordinator.secure`)."""

    enabled: bool = False
    threshold: float = 0.6
    """``t = ceil(threshold * n)`` (at least 2): up to ``n - t`` members may drop out; fewer than ``t`` colluding learn nothing."""
    clip: float = 0.05
    """Every sent value is clipped to ``[-clip, clip]`` (what is clipped off stays in the device's residual)."""
    bits: int = 12
    """Bits per quantized value; the ring adds ``ceil(log2 n)``, at most 32 in all."""
    fraction: float = 0.03
    """Shared coordinates (rand-k from the cohort's seed), as a fraction of the trainable values."""
    round_s: float = 30.0
    """How long the keys, shares and unmask rounds each wait for members that have not answered."""
    noise_multiplier: float = 0.0
    """Distributed DP (0: off): the members' Skellam noise adds up, over at least ``t`` survivors, to
    a standard deviation of ``noise_multiplier`` times the sum's L2 sensitivity (``docs/privacy.md``)."""
    l2_clip: float = 0.0
    """Distributed DP: each member's sent values are clipped to this L2 norm (needed with noise)."""
    delta: float = 1e-5
    """Distributed DP: the δ its ε is reported at."""
    epsilon_budget: float = 0.0
    """Distributed DP: no cohort opens that would take ε past this (0: no budget)."""

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1.0:
            raise ValueError(f"secagg.threshold must be in (0.5, 1], got {self.threshold}")
        if not (0 < self.clip <= 1e6 and math.isfinite(self.clip)):
            raise ValueError(f"secagg.clip must be in (0, 1e6], got {self.clip}")
        if not 2 <= self.bits <= 22:
            raise ValueError(f"secagg.bits must be in 2..22 (the ring is 32 bits, and a cohort of 1000 takes 10), got {self.bits}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"secagg.fraction must be in (0, 1], got {self.fraction}")
        if not 1.0 <= self.round_s <= 3600.0:
            raise ValueError(f"secagg.round_s must be in 1..3600 seconds, got {self.round_s}")
        if not 0.0 <= self.noise_multiplier <= 100.0 or (self.noise_multiplier > 0 and not 0 < self.l2_clip <= self.clip * 1e3):
            raise ValueError("secagg.noise_multiplier must be in 0..100, and with noise secagg.l2_clip must be positive")
        if not 0.0 < self.delta < 1.0 or self.epsilon_budget < 0:
            raise ValueError("secagg.delta must be in (0, 1) and secagg.epsilon_budget non-negative")

    @property
    def dp(self) -> DPConfig | None:
        """Distributed DP as the accountant sees it (None when off)."""
        if self.noise_multiplier <= 0:
            return None
        return DPConfig(
            enabled=True, clip=self.l2_clip, noise_multiplier=self.noise_multiplier, delta=self.delta, epsilon_budget=self.epsilon_budget
        )


def sensitivity(cfg: SecureConfig, n: int, k: int) -> float:
    """The L2 sensitivity of the cohort's integer sum to one member: its clipped values scaled
    to integers, plus at most 1 per coordinate from the stochastic rounding."""
    return cfg.l2_clip * Quantizer(cfg.clip, n, cfg.bits).scale + math.sqrt(k)


def skellam_share(cfg: SecureConfig, n: int, t: int, k: int) -> float:
    """Each member's Skellam parameter: the noise of any ``t`` survivors adds up to a variance of
    ``(noise_multiplier * sensitivity)^2``. More survivors add more noise than that (at most
    ``n / t`` times the variance); fewer than ``t`` unmask nothing."""
    sigma = cfg.noise_multiplier * sensitivity(cfg, n, k)
    return sigma * sigma / (2.0 * t)


class SecureCohort:
    """The coordinator's side of one cohort's rounds. Pure: ``now`` comes in, messages go out."""

    def __init__(self, cfg: SecureConfig, cohort: Cohort, size: int, seed: bytes, now: float) -> None:
        n = len(cohort.members)
        if not MIN_MEMBERS <= n <= MAX_COHORT:
            raise SecAggError(f"a securely aggregated cohort has {MIN_MEMBERS}..{MAX_COHORT} members, not {n}")
        self.cfg, self.cohort, self.seed = cfg, cohort, seed
        self.members = {i + 1: d for i, d in enumerate(sorted(cohort.members))}
        self.position = {d: i for i, d in self.members.items()}
        self.n = n
        self.t = max(2, min(n, math.ceil(cfg.threshold * n)))
        self.k = max(1, min(size, round(cfg.fraction * size)))
        self.size = size
        self.mu = skellam_share(cfg, n, self.t, self.k)  # 0 without distributed DP
        self.quantizer = Quantizer(cfg.clip, n, cfg.bits, noise_sigma=math.sqrt(2.0 * self.mu * n))
        self.phase = "keys"
        self.until = now + cfg.round_s
        self.keys: dict[int, Keys] = {}
        self.sealed: dict[int, list[Sealed]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.reveals: dict[int, Reveal] = {}
        self.refused: dict[int, str] = {}
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.ring_sum: np.ndarray | None = None
        """The exact sum of the survivors' quantized inputs, mod ``2^ring_bits``."""
        self.total: np.ndarray | None = None
        """The recovered sum (float) of the survivors' clipped updates at :attr:`indices`."""
        self.failed: str | None = None

    @property
    def id(self) -> str:
        return self.cohort.cohort

    @property
    def finished(self) -> bool:
        return self.total is not None or self.failed is not None

    @property
    def survivors(self) -> list[str]:
        return [self.members[i] for i in self.u3] if self.total is not None else []

    def params(self, device: str) -> SecAggParams:
        q = self.quantizer
        return SecAggParams(self.position[device], self.n, self.t, q.clip, q.value_bits, self.k, self.seed.hex(), self.cfg.l2_clip, self.mu)

    # -- messages in --------------------------------------------------------------------

    def receive(self, msg: SecAggMessage, now: float) -> list[SecAggMessage]:
        """Take one member's message; what to send now. Raises :class:`SecAggError` for a bad one;
        a message of a round that is over, or a second one of this round, is ignored."""
        pos = self.position.get(msg.device)
        if pos is None or msg.cohort != self.id:
            raise SecAggError(f"{msg.device} is not a member of cohort {msg.cohort}")
        if self.finished:
            return []
        if msg.kind == "refuse":
            self.refused[pos] = str(msg.fields.get("why", ""))[:300]
            log.warning("cohort %s: %s refused to answer: %s", self.id, msg.device, self.refused[pos])
        elif self.phase == "keys" and msg.kind == "keys" and pos not in self.keys:
            keys = read_keys_up(msg, self.n)
            if keys.index != pos:
                raise SecAggError(f"{msg.device} is member {pos} of cohort {self.id}, its keys say {keys.index}")
            self.keys[pos] = keys
        elif self.phase == "shares" and msg.kind == "shares" and pos in self.u1 and pos not in self.sealed:
            sealed = read_shares(msg, pos, self.n, up=True)
            if sorted(m.receiver for m in sealed) != self.u1:
                raise SecAggError(f"{msg.device}'s shares are not one for each of the {len(self.u1)} members with keys")
            self.sealed[pos] = sealed
        elif self.phase == "masked" and msg.kind == "masked" and pos in self.u2 and pos not in self.masked:
            r = self.quantizer.ring_bits
            if msg.fields.get("values") != self.k or msg.fields.get("ring_bits") != r:
                raise SecAggError(f"{msg.device}'s masked vector is not {self.k} values of {r} bits")
            self.masked[pos] = unpack(msg.body, r, self.k)
        elif self.phase == "unmask" and msg.kind == "reveal" and pos in self.u3 and pos not in self.reveals:
            reveal = read_reveal(msg, self.n)
            dropped = set(self.u2) - set(self.u3)
            if reveal.index != pos or not set(reveal.b_shares) <= set(self.u3) or not set(reveal.s_shares) <= dropped:
                raise SecAggError(f"{msg.device}'s reveal holds shares the coordinator did not ask for")
            self.reveals[pos] = reveal
        else:
            return []  # a redelivery, or a round that is over
        return self._advance(now, timed_out=False)

    def tick(self, now: float) -> list[SecAggMessage]:
        """Close a round whose time is up."""
        if self.finished:
            return []
        if now >= self.cohort.deadline:
            self.failed = f"round {self.phase} was still open at the cohort's deadline"
            log.warning("cohort %s fails: %s", self.id, self.failed)
            return []
        if now < self.until:
            return []
        return self._advance(now, timed_out=True)

    # -- rounds -------------------------------------------------------------------------

    def _waiting(self) -> tuple[set[int], dict[int, object]]:
        expected = {"keys": set(self.members), "shares": set(self.u1), "masked": set(self.u2), "unmask": set(self.u3)}[self.phase]
        got: dict[int, object] = {"keys": self.keys, "shares": self.sealed, "masked": self.masked, "unmask": self.reveals}[self.phase]  # type: ignore[assignment]
        return expected - set(got) - set(self.refused), got

    def _advance(self, now: float, *, timed_out: bool) -> list[SecAggMessage]:
        waiting, got = self._waiting()
        if waiting and not timed_out:
            return []
        if len(got) < self.t:
            self.failed = f"round {self.phase}: {len(got)} of {self.n} members answered, fewer than the threshold {self.t}"
            log.warning("cohort %s fails: %s", self.id, self.failed)
            return []
        answered = sorted(got)
        if self.phase == "keys":
            self.u1, self.phase, self.until = answered, "shares", now + self.cfg.round_s
            keys = [self.keys[i] for i in self.u1]
            return [keys_down(self.id, self.members[i], keys, self.n, self.t) for i in self.u1]
        if self.phase == "shares":
            self.u2, self.phase = answered, "masked"
            self.until = max(now + self.cfg.round_s, self.cohort.deadline - 2 * self.cfg.round_s)
            routed = {j: [m for i in self.u2 for m in self.sealed[i] if m.receiver == j] for j in self.u2}
            return [shares_msg(self.id, self.members[j], routed[j], up=False) for j in self.u2]
        if self.phase == "masked":
            self.u3, self.phase, self.until = answered, "unmask", now + self.cfg.round_s
            dropped = sorted(set(self.u2) - set(self.u3))
            return [unmask_down(self.id, self.members[i], self.u3, dropped) for i in self.u3]
        try:
            u2_keys = {i: self.keys[i] for i in self.u2}
            total = unmask(self.id.encode(), self.t, u2_keys, self.masked, list(self.reveals.values()), self.k, self.quantizer.ring_bits)
        except SecAggError as exc:
            self.failed = f"unmasking: {exc}"
            log.error("cohort %s fails: %s", self.id, self.failed)
            return []
        self.ring_sum = total
        self.total = self.quantizer.decode_sum(total)
        return []

    def indices(self) -> np.ndarray:
        return shared_indices(self.seed, self.size, self.k)

    def mean_step(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The survivors' mean update as dense tensors (sorted names, each flattened in order)."""
        assert self.total is not None
        flat = np.zeros(self.size, dtype=np.float64)
        flat[self.indices()] = self.total / len(self.u3)
        out, off = {}, 0
        for name in sorted(shapes):
            count = math.prod(shapes[name])
            out[name] = flat[off : off + count].astype(np.float32).reshape(shapes[name])
            off += count
        return out


class SecureRounds:
    """Every open secure cohort of the coordinator: verifies, routes and publishes their messages."""

    def __init__(
        self,
        cfg: SecureConfig,
        fleet: str,
        shapes: Mapping[str, tuple[int, ...]],
        identity: Callable[[str], Mapping[str, object] | None],
        signer: protocol.Signer,
        publish: Callable[[str, bytes], None],
        cohort_seed: int = 0,
    ) -> None:
        self.cfg, self.fleet, self.signer, self.publish = cfg, fleet, signer, publish
        self.shapes = dict(shapes)
        self.size = sum(math.prod(s) for s in self.shapes.values())
        self.identity = identity
        self.cohort_seed = cohort_seed
        self.open: dict[str, SecureCohort] = {}
        self.recent: deque[SecureCohort] = deque(maxlen=16)
        """The last cohorts whose rounds are over, for inspection (the tests read their exact sums)."""

    def params(self, cohort: Cohort, now: float) -> dict[str, SecAggParams]:
        """Start ``cohort``'s rounds: each member's parameters, for its invitation."""
        seed = hashlib.sha256(f"fedge secagg cohort seed v1\x00{self.fleet}\x00{self.cohort_seed}\x00{cohort.cohort}".encode()).digest()
        sc = SecureCohort(self.cfg, cohort, self.size, seed, now)
        self.open[cohort.cohort] = sc
        return {d: sc.params(d) for d in cohort.members}

    def _verifier(self, device: str) -> protocol.Verifier:
        verify = enrolled_key(self.identity(device))
        if verify is None:
            raise SecAggError(f"{device!r} is not an enrolled device, and every secure-aggregation message is signed")
        return verify

    def handle(self, device: str, payload: bytes, now: float) -> None:
        """One message from ``device``'s secagg topic. Raises :class:`Rejection` (``secagg``) for a bad one."""
        try:
            msg = decode(payload, self._verifier, UP_KINDS, max_body=self._max_body())
            if msg.device != device:
                raise SecAggError(f"a message on {device}'s topic names {msg.device}")
            sc = self.open.get(msg.cohort)
            if sc is None:
                log.info("secagg %s from %s for cohort %s, which is not open: ignored", msg.kind, device, msg.cohort)
                return
            out = sc.receive(msg, now)
        except SecAggError as exc:
            raise Rejection("secagg", str(exc)) from None
        self._send(sc, out)

    def _max_body(self) -> int:
        k = max(1, round(self.cfg.fraction * self.size))
        return max(MAX_COHORT * 200, (k * 32 + 7) // 8)

    def tick(self, now: float) -> None:
        for sc in list(self.open.values()):
            self._send(sc, sc.tick(now))

    def _send(self, sc: SecureCohort, out: list[SecAggMessage]) -> None:
        for m in out:
            self.publish(protocol.cohort_secagg(self.fleet, sc.id, m.device), m.encode(self.signer))

    def take_finished(self) -> list[SecureCohort]:
        """Cohorts whose rounds are over (recovered or failed), for the caller to apply or drop."""
        done = [sc for sc in self.open.values() if sc.finished]
        for sc in done:
            del self.open[sc.id]
            self.recent.append(sc)
        return done
