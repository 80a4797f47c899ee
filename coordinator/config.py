"""Coordinator configuration: frozen dataclasses loaded once from TOML plus environment overrides.

Precedence (last wins): defaults < the TOML file < ``FEDGE_COORD__SECTION__KEY`` variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from compression import CodecConfig
from compression.protocol import ProtocolError, check_id
from compression.records import RecordError, env_overrides, from_mapping
from coordinator.errors import ConfigError
from coordinator.privacy import DPConfig
from coordinator.strategy import StrategyConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "FEDGE_COORD"


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    session_expiry_s: int = 86400
    """How long the broker keeps unacknowledged updates for the coordinator while it is down."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker.port must be in 1..65535, got {self.port}")


@dataclass(frozen=True)
class ModelSpecConfig:
    """The base model and the adapters the fleet trains."""

    source: str = "smollm2"
    """``smollm2``, a ``.gguf`` file or a model directory; only its config is read."""
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_seed: int = 0
    embedding: bool = False
    """Also keep an input-embedding delta table, for devices of the ``embedding`` tier (mixed fleets)."""
    """Seed of the LoRA A matrices of version 0."""

    def __post_init__(self) -> None:
        if not 1 <= self.lora_r <= 1024:
            raise ConfigError(f"model.lora_r must be in 1..1024, got {self.lora_r}")
        if not self.targets:
            raise ConfigError("model.targets must name at least one module")


@dataclass(frozen=True)
class LimitsConfig:
    """What an update may be."""

    max_update_bytes: int = 16 << 20
    allow_unknown_devices: bool = True
    """Accept unsigned updates from devices that were never enrolled (lab use; set false in production)."""
    require_signatures: bool = False
    """Refuse every unsigned update, enrolled device or not."""
    max_update_norm: float = 0.0
    """Reject updates whose L2 norm exceeds this (0 = off)."""
    devices: tuple[str, ...] = ()
    """Devices accepted when ``allow_unknown_devices`` is false."""
    max_updates_per_minute: float = 0.0
    """Per-device rate limit (token bucket, burst of the same size; 0 = off)."""
    rate_burst: int = 0
    """Updates a device may send at once before the rate applies (0 = one minute's worth)."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator needs; see ``docs/configuration.md``."""

    state_dir: str
    fleet: str = "default"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    model: ModelSpecConfig = field(default_factory=ModelSpecConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    """Central differential privacy (DP-FedBuff); needs ``strategy.kind = "fedbuff"``."""
    downlink: CodecConfig = field(default_factory=lambda: CodecConfig(topk_fraction=0.02, values="int8"))
    """Codec of the global deltas published each version (with error feedback at the coordinator)."""
    keep_versions: int = 20
    """Snapshot files kept on disk; older versions keep their ledger rows."""
    snapshot_zstd_level: int = 3
    heartbeat_s: float = 10.0
    metrics_port: int = 0
    """Port of the Prometheus ``/metrics`` endpoint (0 = off)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds to."""

    def __post_init__(self) -> None:
        try:
            check_id(self.fleet, "fleet")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if self.dp.enabled and self.strategy.kind != "fedbuff":
            raise ConfigError(f"dp.enabled needs strategy.kind = 'fedbuff' (DP-FedBuff), got {self.strategy.kind!r}")
        if self.dp.enabled and self.strategy.robust.rule != "none":
            raise ConfigError("dp.enabled replaces robust aggregation (clipping is the bound); set strategy.robust.rule = 'none'")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.keep_versions < 2:
            raise ConfigError(f"keep_versions must be at least 2, got {self.keep_versions}")


def parse_config(data: Mapping[str, Any], where: str, environ: Mapping[str, str] | None = None) -> CoordinatorConfig:
    merged = env_overrides(dict(data), ENV_PREFIX, os.environ if environ is None else environ)
    try:
        return from_mapping(CoordinatorConfig, merged, where)
    except (RecordError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> CoordinatorConfig:
    """Load and validate the coordinator's TOML config file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    cfg = parse_config(data, str(path), environ)
    base = path.resolve().parent
    source = cfg.model.source
    if source != "smollm2" and not Path(source).is_absolute():
        source = str((base / source).resolve())
    return replace(cfg, state_dir=str((base / cfg.state_dir).resolve()), model=replace(cfg.model, source=source))
