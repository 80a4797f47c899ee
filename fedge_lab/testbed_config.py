"""The testbed's TOML: the fleet's groups of agents, churn, a broker restart, simulated devices."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from compression import CodecConfig
from compression.records import RecordError, from_mapping
from coordinator.cohorts import CohortConfig
from coordinator.errors import ConfigError
from coordinator.strategy import StrategyConfig
from fedge_lab.netem import Impairment
from fedge_lab.objective import ObjectiveConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_DURATION_S = 6 * 3600.0
MAX_REAL_AGENTS = 32
MAX_SIM_DEVICES = 20000


@dataclass(frozen=True)
class AgentGroup:
    count: int = 1
    kind: Literal["real", "sim"] = "sim"
    profile: str = "raspberry-pi-4"
    """Device profile of real agents (simulated devices report ``sim-<speed>x``)."""
    speed: float = 1.0
    """1 = full speed; 3 = three times slower (real agents: ``train.slowdown``; simulated: ``step_s x speed``)."""
    impaired: bool = False
    """Run this group behind the impaired link (needs ``[impairment]``)."""
    name: str = ""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"agents.count must not be negative, got {self.count}")
        if not 1.0 <= self.speed <= 1000.0:
            raise ConfigError(f"agents.speed must be in [1, 1000], got {self.speed}")

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}-{self.speed:g}x" + ("-impaired" if self.impaired else "")


@dataclass(frozen=True)
class ChurnPlan:
    kill_every_s: float = 0.0
    """Real agents: SIGKILL one at random this often (0 = never), restart it ``restart_after_s`` later."""
    restart_after_s: float = 5.0
    sim_drops_per_min: float = 0.0
    """Simulated devices: connection drops per device per minute (the broker fires the Last Will)."""
    sim_down_s: float = 5.0


@dataclass(frozen=True)
class BrokerRestart:
    at_s: float = 0.0
    """Seconds into the run to stop the broker (0 = never); it comes back ``down_s`` later."""
    down_s: float = 3.0
    kill: bool = False
    """SIGKILL instead of SIGTERM."""


@dataclass(frozen=True)
class SimSettings:
    step_s: float = 1.0
    """Compute time of one simulated round at speed 1."""
    processes: int = 2
    sync_wait_s: float = 30.0
    heartbeat_s: float = 30.0
    hidden: int = 512
    """Shape of the simulated model (when no real agents fix it): a Llama config of this size
    (LoRA on q and v: ``layers x 4 x r x hidden`` parameters; 65,536 by default)."""
    layers: int = 4
    lora_r: int = 8
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)

    def __post_init__(self) -> None:
        if self.step_s <= 0 or self.processes < 1 or self.sync_wait_s <= 0:
            raise ConfigError("sim.step_s and sim.sync_wait_s must be positive and sim.processes at least 1")


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest test class, despite its name

    duration_s: float = 60.0
    fleet: str = "lab"
    seed: int = 0
    model: Literal["auto", "tiny", "smollm2", "sim"] = "auto"
    """Model of the fleet: with real agents ``tiny`` or ``smollm2`` (``auto``: tiny), else the simulated spec."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    cohorts: CohortConfig = field(default_factory=CohortConfig)
    """The coordinator's ``[cohorts]``: invite devices to train, at most ``concurrency`` at once."""
    agents: tuple[AgentGroup, ...] = (AgentGroup(count=10),)
    churn: ChurnPlan = field(default_factory=ChurnPlan)
    broker_restart: BrokerRestart = field(default_factory=BrokerRestart)
    impairment: Impairment = field(default_factory=Impairment)
    sim: SimSettings = field(default_factory=SimSettings)
    heartbeat_s: float = 2.0
    """Coordinator status interval."""
    downlink: CodecConfig | None = None
    """The coordinator's downlink codec (default: its own default, top-2% int8)."""
    start_delay_s: float = 5.0
    """Simulated devices connect first and start training together this long after launch."""

    def __post_init__(self) -> None:
        if not 1.0 <= self.duration_s <= MAX_DURATION_S:
            raise ConfigError(f"duration_s must be in [1, {MAX_DURATION_S:.0f}], got {self.duration_s}")
        real = sum(g.count for g in self.agents if g.kind == "real")
        sim = sum(g.count for g in self.agents if g.kind == "sim")
        if real + sim == 0:
            raise ConfigError("agents: the testbed needs at least one agent")
        if real > MAX_REAL_AGENTS:
            raise ConfigError(f"agents: {real} real agents; at most {MAX_REAL_AGENTS} fit one machine (use kind = 'sim' for scale)")
        if sim > MAX_SIM_DEVICES:
            raise ConfigError(f"agents: {sim} simulated devices; at most {MAX_SIM_DEVICES}")
        if real and self.model == "sim":
            raise ConfigError("model = 'sim' has no weights for real agents; use 'tiny' or 'smollm2'")
        if any(g.impaired for g in self.agents) and not self.impairment.active:
            raise ConfigError("agents.impaired needs an [impairment] with delay_ms, loss_pct or rate_kbit")

    @property
    def real_agents(self) -> int:
        return sum(g.count for g in self.agents if g.kind == "real")


def load_testbed_config(path: str | Path) -> TestbedConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return from_mapping(TestbedConfig, data, str(path))
    except (RecordError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
