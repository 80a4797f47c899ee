"""A new version from a global step: what the coordinator sends is exactly what it applies.

The step goes out through the downlink codec with the coordinator's own error feedback,
and the new state is the old one plus what was sent, so devices that apply the same frame
hold bit-identical state, version after version. Shared by the MQTT service and the
in-process simulation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from compression import CodecConfig, CodecError, ErrorFeedback, FrameKind, apply_delta, compress_update
from coordinator.errors import Rejection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NextVersion:
    state: dict[str, np.ndarray]
    frame: bytes
    """The global-delta frame devices apply."""
    feedback: ErrorFeedback
    """The coordinator's residual after this version."""


def next_version(
    state: dict[str, np.ndarray], step: dict[str, np.ndarray], downlink: CodecConfig, feedback: ErrorFeedback, version: int
) -> NextVersion:
    """Version ``version`` from ``state`` and ``step``; raises :class:`Rejection` (``non_finite``) if it would not be finite."""
    if not all(np.all(np.isfinite(v)) for v in step.values()):
        raise Rejection("non_finite", "the global step is not finite")
    try:
        down = compress_update(step, downlink, feedback, kind=FrameKind.GLOBAL_DELTA, phase=version)
    except CodecError as exc:
        # The residual overflowed (it keeps what earlier versions did not send): drop it
        # rather than the version. Devices never see the residual, so nothing diverges.
        log.warning("downlink residual dropped: %s", exc)
        down = compress_update(step, downlink, ErrorFeedback(), kind=FrameKind.GLOBAL_DELTA, phase=version)
    new_state = apply_delta(state, down.sent)
    if not all(np.all(np.isfinite(v)) for v in new_state.values()):
        raise Rejection("non_finite", "the step would make the global state overflow float32")
    return NextVersion(new_state, down.frame, down.feedback)
