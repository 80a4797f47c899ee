"""Follow the fleet's global versions from the retained MQTT messages, as a device would.

Used by simulated devices (one mirror per fleet process) and by benchmarks that score
every version the coordinator publishes. The rule is the agent's own
(:class:`compression.follower.Follower`): a delta chain from the held version is applied,
otherwise the snapshot is taken, and either way the result must match the coordinator's
state digest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from compression import CodecError, protocol
from compression.follower import Follower
from compression.protocol import GlobalMeta

log = logging.getLogger(__name__)


class GlobalMirror:
    """Feed it every message of the three global topics; it holds the newest verified version."""

    def __init__(self, fleet: str, on_version: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> None:
        self.fleet = fleet
        self.topics = (protocol.global_meta(fleet), protocol.global_snapshot(fleet), protocol.global_delta(fleet))
        self.follower = Follower()
        self.on_version = on_version
        self.bytes_down = 0
        self.errors = 0
        self.adopted_at: dict[int, float] = {}
        """Wall-clock time each version was adopted here."""

    @property
    def version(self) -> int | None:
        return self.follower.version

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.follower.tensors

    @property
    def spec(self) -> dict[str, object]:
        meta = self.follower.meta
        return dict(meta.model) if meta is not None else {}

    def handle(self, topic: str, payload: bytes) -> None:
        self.bytes_down += len(payload)
        meta_t, snap_t, delta_t = self.topics
        if topic == snap_t:
            self.follower.add_snapshot(payload)
        elif topic == delta_t:
            self.follower.add_delta(payload)
        elif topic == meta_t:
            try:
                self.follower.add_meta(GlobalMeta.from_json(payload))
            except CodecError as exc:
                self.errors += 1
                log.warning("bad global meta ignored: %s", exc)
                return
        result = self.follower.follow()
        self.errors += len(result.problems)
        for problem in result.problems:
            log.warning("%s", problem)
        if result.moved and result.version is not None:
            self.adopted_at[result.version] = time.time()
            if self.on_version is not None:
                self.on_version(result.version, self.follower.tensors)
