"""A device's side of one securely aggregated cohort, pure: messages in, messages out.

Used by ``fedge-agent`` and by the lab's devices. The rounds (``docs/secure-aggregation.md``):

1. On the invitation, :meth:`DeviceSession.start` gives the device's ``keys`` message.
2. On the coordinator's ``keys`` (every member's public keys), it answers with its sealed
   ``shares``.
3. On the coordinator's ``shares`` (those addressed to it), it is ready to mask.
4. :meth:`submit` takes its trained update, flattened (sorted tensor names, each
   ``reshape(-1)``), plus its residual: it keeps the cohort's shared coordinates, clips and
   quantizes them, and answers with its ``masked`` vector as soon as step 3 is done.
5. On ``unmask``, it answers with its ``reveal``, or with ``refuse`` when the request is one
   an honest device must refuse (both shares of one member, itself named a dropout, fewer
   survivors than the threshold); it then answers nothing more for this cohort.

A message out of turn raises :class:`~compression.secagg.SecAggError` and changes nothing.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from compression.protocol import CohortInvite, SecAggParams
from compression.secagg import MaskingClient, Quantizer, SecAggError, pack, shared_indices, skellam
from compression.secagg_wire import (
    SecAggMessage,
    keys_up,
    masked_up,
    read_keys_down,
    read_shares,
    read_unmask,
    refuse_up,
    reveal_up,
    shares_msg,
)


class DeviceSession:
    def __init__(self, invite: CohortInvite) -> None:
        if invite.secagg is None:
            raise SecAggError(f"cohort {invite.cohort} is not securely aggregated")
        self.invite = invite
        self.params: SecAggParams = invite.secagg
        p = self.params
        self.cohort = invite.cohort
        self.device = invite.device
        self.client = MaskingClient(invite.cohort.encode(), p.position, p.n, p.t)
        self.quantizer = Quantizer(p.clip, p.n, p.bits, noise_sigma=math.sqrt(2.0 * p.mu * p.n))
        self.phase = "keys"
        """keys, then shares, ready (shares received), masked (input sent), done, or refused."""
        self._pending: np.ndarray | None = None
        self.refusal: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "refused")

    def start(self) -> SecAggMessage:
        return keys_up(self.cohort, self.device, self.client.keys())

    def indices(self, size: int) -> np.ndarray:
        """The cohort's shared coordinates in a trainable vector of ``size`` values."""
        return shared_indices(bytes.fromhex(self.params.seed), size, self.params.k)

    def handle(self, msg: SecAggMessage) -> SecAggMessage | None:
        """The answer to one coordinator message (None: nothing to send yet)."""
        if msg.cohort != self.cohort or msg.device != self.device:
            raise SecAggError(f"a secagg message for {msg.device} in {msg.cohort} reached {self.device} in {self.cohort}")
        n = self.params.n
        if msg.kind == "keys" and self.phase == "keys":
            sealed = self.client.share(read_keys_down(msg, n))
            self.phase = "shares"
            return shares_msg(self.cohort, self.device, sealed, up=True)
        if msg.kind == "shares" and self.phase == "shares":
            self.client.receive(read_shares(msg, self.params.position, n, up=False))
            self.phase = "ready"
            return self._masked()
        if msg.kind == "unmask" and self.phase == "masked":
            survivors, dropped = read_unmask(msg, n)
            try:
                reveal = self.client.reveal(survivors, dropped)
            except SecAggError as exc:
                self.phase, self.refusal = "refused", str(exc)
                return refuse_up(self.cohort, self.device, str(exc))
            self.phase = "done"
            return reveal_up(self.cohort, self.device, reveal)
        raise SecAggError(f"cohort {self.cohort}: a {msg.kind!r} message does not fit the {self.phase!r} phase")

    def submit(
        self, flat: np.ndarray, rng: np.random.Generator, noise_rng: np.random.Generator | None = None
    ) -> tuple[SecAggMessage | None, np.ndarray]:
        """Take the trained update ``flat`` (float, the whole trainable vector, residual added):
        the masked message if the shares are in (else it goes when they arrive), and the new
        residual (what was not sent: everything outside the shared coordinates, and the
        clipping and quantization error inside them). Under distributed DP the sent values are
        clipped to ``l2_clip`` in L2, and Skellam noise from ``noise_rng`` (by default seeded
        from the OS, so that nobody else can predict it) is added to them; the noise never
        enters the residual."""
        if self._pending is not None or self.phase in ("masked", "done", "refused"):
            raise SecAggError(f"cohort {self.cohort}: this device already submitted its update")
        flat = np.asarray(flat, dtype=np.float64).reshape(-1)
        idx = self.indices(flat.size)
        sent = flat[idx]
        p = self.params
        if p.l2_clip > 0:
            sent = sent * min(1.0, p.l2_clip / max(float(np.linalg.norm(sent)), 1e-30))
        enc = self.quantizer.encode(sent, rng)
        residual = flat.copy()
        residual[idx] -= enc.view(np.int32) / self.quantizer.scale
        if p.mu > 0:
            noise_rng = noise_rng if noise_rng is not None else np.random.default_rng(secrets.randbits(128))
            enc = enc + skellam(p.mu, enc.size, noise_rng)
        self._pending = enc
        return self._masked(), residual

    def _masked(self) -> SecAggMessage | None:
        if self._pending is None or self.phase != "ready":
            return None
        r = self.quantizer.ring_bits
        y = self.client.mask(self._pending, r)
        self._pending = None
        self.phase = "masked"
        return masked_up(self.cohort, self.device, pack(y, r), int(y.size), r)
