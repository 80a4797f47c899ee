"""A device's side of cohorts, pure: which invitation it holds, and acting on each one once.

When the fleet's global meta says ``cohorts``, a device trains only while it holds an open
invitation (:class:`~compression.protocol.CohortInvite`). It trains one round for it on the
invited version or a later one, names the cohort in the update's header, and is done with
it. The deadline is counted on the device's own monotonic clock from the moment the
invitation arrives (its length is ``deadline - issued``), so a device whose wall clock is
wrong still keeps to it; the coordinator refuses an update that comes after its own
deadline anyway (``not_invited``). ``fedge-agent`` and the lab's simulated devices both
use this.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from compression.errors import ProtocolError
from compression.protocol import CohortInvite

LATE_GRACE_S = 300.0
"""An invitation whose deadline passed this long ago by the device's wall clock was queued
while the device was away; it is not worth training for."""


@dataclass(frozen=True)
class Held:
    invite: CohortInvite
    until: float
    """The deadline on the device's monotonic clock."""


class Invitations:
    def __init__(self, device: str, remember: int = 64) -> None:
        self.device = device
        self.held: Held | None = None
        self._done: deque[str] = deque(maxlen=remember)

    def offer(self, invite: CohortInvite, mono: float, wall: float) -> str | None:
        """Take an invitation that arrived at ``mono`` (monotonic) / ``wall`` (Unix time); returns
        why it was ignored, or None. Raises :class:`ProtocolError` for another device's."""
        if invite.device != self.device:
            raise ProtocolError(f"cohort invitation names device {invite.device!r}, not this one")
        if invite.cohort in self._done or (self.held is not None and self.held.invite.cohort == invite.cohort):
            return f"cohort {invite.cohort}: already taken"
        if wall > invite.deadline + LATE_GRACE_S:
            return f"cohort {invite.cohort}: its deadline passed {wall - invite.deadline:.0f} s ago"
        self.held = Held(invite, mono + (invite.deadline - invite.issued))
        return None

    def current(self, mono: float) -> CohortInvite | None:
        """The open invitation, if any (one past its deadline is dropped)."""
        if self.held is not None and mono >= self.held.until:
            self._done.append(self.held.invite.cohort)
            self.held = None
        return self.held.invite if self.held is not None else None

    def used(self) -> str:
        """The device trained for its invitation: its cohort id, and the invitation is spent."""
        if self.held is None:
            return ""
        cohort = self.held.invite.cohort
        self._done.append(cohort)
        self.held = None
        return cohort
