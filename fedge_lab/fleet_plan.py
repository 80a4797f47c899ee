"""What a simulated-fleet process runs: its devices, broker, timing, objective, codec and churn."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from compression import CodecConfig
from compression.records import from_mapping
from fedge_lab.objective import ObjectiveConfig


@dataclass(frozen=True)
class SimDevice:
    id: str
    index: int
    """Position in the whole fleet: picks the data domain and the random streams."""
    speed: float = 1.0
    """Compute-time multiplier: 3.0 is a device three times slower than ``step_s``."""


@dataclass(frozen=True)
class ChurnConfig:
    drops_per_min: float = 0.0
    """Expected connection drops per device per minute (abrupt: the broker fires the Last Will)."""
    down_s: float = 5.0
    """How long a dropped device stays away (uniform 0.5x..1.5x)."""


@dataclass(frozen=True)
class FleetPlan:
    host: str
    port: int
    fleet: str
    devices: tuple[SimDevice, ...]
    v0_path: str
    """A snapshot frame of version 0: the objective's origin (no torch in this process)."""
    start_at: float
    """Wall-clock time at which devices start training (they connect before)."""
    end_at: float
    log_path: str
    step_s: float = 1.0
    sync_wait_s: float = 30.0
    heartbeat_s: float = 30.0
    connect_per_s: float = 200.0
    seed: int = 0
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    churn: ChurnConfig = field(default_factory=ChurnConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "fleet plan") -> FleetPlan:
        return from_mapping(cls, json.loads(text), where)
