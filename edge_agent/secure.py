"""The agent's side of securely aggregated cohorts (``docs/secure-aggregation.md``).

An invitation that carries ``secagg`` starts a :class:`~compression.secagg_device.DeviceSession`:
the agent sends its keys at once, answers the coordinator's key list with its sealed shares,
and trains only once the shares addressed to it are in (the key exchange takes two round
trips, and a device busy training could not answer it in time). Its trained update then goes
masked, on the cohort's shared coordinates, never in the clear; the residual (everything it
did not send) is added to its next secure update, as error feedback. The residual lives in
memory: a restarted agent starts a new one. The unmasking round is answered while the agent
waits for its next invitation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from compression import protocol
from compression.protocol import CohortInvite
from compression.secagg import SecAggError
from compression.secagg_device import DeviceSession
from compression.secagg_wire import DOWN_KINDS, SecAggMessage, decode

log = logging.getLogger(__name__)


class SecureCohorts:
    """One securely aggregated cohort at a time (a device holds one invitation at a time)."""

    def __init__(
        self,
        fleet: str,
        device: str,
        signer: Callable[[bytes], bytes] | None,
        verify: protocol.Verifier | None,
        publish: Callable[[str, bytes], None],
    ) -> None:
        self.fleet, self.device = fleet, device
        self._signer = signer
        self._verify: protocol.Verifier = verify if verify is not None else (lambda sig, msg: True)  # lab mode: warned at start
        self._publish = publish
        self.session: DeviceSession | None = None
        self.residual: np.ndarray | None = None
        self.cohorts = 0
        self.until = 0.0
        """The current cohort's deadline, on the monotonic clock."""

    def busy(self, mono: float) -> bool:
        """Whether this device sent its masked update and still owes the cohort its unmasking answer
        (until the cohort's deadline)."""
        return self.session is not None and self.session.phase == "masked" and mono < self.until

    def invited(self, invite: CohortInvite, mono: float) -> None:
        """Start the rounds of ``invite``'s cohort (it arrived at ``mono``, monotonic): send this device's keys."""
        if self._signer is None:
            raise SecAggError(f"cohort {invite.cohort} is securely aggregated, and this device has no signing_key to sign its messages")
        if self.session is not None and not self.session.finished:
            log.info("cohort %s is left for cohort %s", self.session.cohort, invite.cohort)
        self.session = DeviceSession(invite)
        self.until = mono + (invite.deadline - invite.issued)
        self.cohorts += 1
        self._send(self.session.start())

    def ready(self, cohort: str) -> bool:
        """Whether the key exchange of ``cohort`` is done, so that the device may train for it."""
        s = self.session
        return s is not None and s.cohort == cohort and s.phase == "ready"

    def take(self, topic: str, payload: bytes) -> None:
        """A coordinator message on this device's secagg topic; raises for one it must refuse."""
        msg = decode(payload, lambda _device: self._verify, DOWN_KINDS)
        if topic != protocol.cohort_secagg(self.fleet, msg.cohort, self.device):
            raise SecAggError(f"a secagg message for {msg.device} in {msg.cohort} came on {topic}")
        s = self.session
        if s is None or s.cohort != msg.cohort or s.finished:
            log.info("secagg %s for cohort %s, which this device is not in now: ignored", msg.kind, msg.cohort)
            return
        self._send(s.handle(msg))
        if s.refusal:
            log.warning("cohort %s: refused the coordinator's unmasking request: %s", s.cohort, s.refusal)

    def submit(self, cohort: str, delta: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """The trained update, masked: flattened in sorted name order, the residual added."""
        s = self.session
        if s is None or s.cohort != cohort:
            raise SecAggError(f"no secure-aggregation session for cohort {cohort}")
        flat = np.concatenate([np.asarray(delta[n], dtype=np.float64).reshape(-1) for n in sorted(delta)])
        if self.residual is None or self.residual.size != flat.size:
            self.residual = np.zeros(flat.size)
        msg, self.residual = s.submit(flat + self.residual, rng)
        self._send(msg)

    def _send(self, msg: SecAggMessage | None) -> None:
        if msg is not None:
            assert self._signer is not None
            self._publish(protocol.device_secagg(self.fleet, self.device), msg.encode(self._signer))
