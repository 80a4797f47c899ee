"""Coordinator configuration: frozen dataclasses loaded once from TOML plus environment overrides.

Precedence (last wins): defaults < the TOML file < ``FEDGE_COORD__SECTION__KEY`` variables.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from compression import CodecConfig
from compression.protocol import ProtocolError, check_id
from compression.records import RecordError, env_overrides, from_mapping
from coordinator.cohorts import CohortConfig
from coordinator.errors import ConfigError
from coordinator.privacy import DPConfig
from coordinator.secure import MIN_MEMBERS, SecureConfig
from coordinator.site import SiteConfig
from coordinator.strategy import StrategyConfig

DEFAULT_DOWNLINK = CodecConfig(topk_fraction=0.02, values="int8")
"""The coordinator's default ``[downlink]`` codec (chosen by ``python -m benchmarks.codec``)."""

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
    tls: bool = False
    """Connect over TLS (the shipped broker config listens with TLS only, on 8883)."""
    cafile: str | None = None
    """CA certificate that signed the broker's certificate (the fleet CA); None = the system's CAs."""
    certfile: str | None = None
    """Client certificate (with ``use_identity_as_username``, its CN is the MQTT user name)."""
    keyfile: str | None = None
    """Private key of ``certfile``."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker.port must be in 1..65535, got {self.port}")
        if (self.cafile or self.certfile or self.keyfile) and not self.tls:
            raise ConfigError("broker.cafile, broker.certfile and broker.keyfile need broker.tls = true")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("broker.certfile and broker.keyfile go together")

    @property
    def client_id(self) -> str | None:
        """The MQTT client id is the broker identity (the user name), never chosen freely."""
        return self.username


@dataclass(frozen=True)
class ModelSpecConfig:
    """The base model and the adapters the fleet trains."""

    source: str = "smollm2"
    """``smollm2``, a ``.gguf`` file or a model directory; only its config is read."""
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_seed: int = 0
    """Seed of the LoRA A matrices of version 0."""
    embedding: bool = False
    """Also keep an input-embedding delta table, for devices of the ``embedding`` tier (mixed fleets)."""
    base_sha256: str = ""
    """The content hash of the base's weights (``compression.basehash``) that version 0 records
    and devices must match. Empty: computed from the source's weight files at ``--init``; set
    it for a source that holds only a config (``fedge-agent check`` prints a device's)."""

    def __post_init__(self) -> None:
        if not 1 <= self.lora_r <= 1024:
            raise ConfigError(f"model.lora_r must be in 1..1024, got {self.lora_r}")
        if self.base_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.base_sha256):
            raise ConfigError(f"model.base_sha256 must be 64 lowercase hex digits, got {self.base_sha256[:80]!r}")
        if not self.targets:
            raise ConfigError("model.targets must name at least one module")


@dataclass(frozen=True)
class EvalConfig:
    """Server-side evaluation (``[eval]``): score global versions on held-out text at the
    coordinator, in a child process (``edge_agent.scorer``), so that the coordinator's own
    process stays as light as without it. Off unless ``data_dir`` is set."""

    data_dir: str = ""
    """Held-out text in the agents' formats (.txt, .md, .jsonl); relative to the config file."""
    every: int = 1
    """Score every Nth version (the newest one waiting is scored; older ones waiting are skipped)."""
    blocks: int = 32
    """Blocks of ``seq_len`` tokens scored (the same ones every time)."""
    seq_len: int = 128
    batch_size: int = 4
    threads: int = 1
    quantize: Literal["int8", "none"] = "int8"
    """The base the scorer loads: int8 (as the devices train it, from a model cache in
    ``<state_dir>/eval/model-cache``) or fp32."""

    @property
    def enabled(self) -> bool:
        return bool(self.data_dir)

    def __post_init__(self) -> None:
        for key in ("every", "blocks", "seq_len", "batch_size", "threads"):
            if not 1 <= getattr(self, key) <= 100_000:
                raise ConfigError(f"eval.{key} must be in 1..100000, got {getattr(self, key)}")
        if self.quantize not in ("int8", "none"):
            raise ConfigError(f"eval.quantize must be 'int8' or 'none', got {self.quantize!r}")


@dataclass(frozen=True)
class LimitsConfig:
    """What an update may be."""

    max_update_bytes: int = 16 << 20
    allow_unknown_devices: bool = False
    """Accept unsigned updates from devices that were never enrolled (lab mode only: the daemon warns)."""
    require_signatures: bool = True
    """Refuse every unsigned update, enrolled device or not (turning it off is lab mode: the daemon warns)."""
    norm_bound: Literal["adaptive", "fixed", "off"] = "adaptive"
    """How update norms are bounded: relative to the fleet's recent median (``adaptive``), by
    ``max_update_norm`` (``fixed``), or not at all (``off``). See ``coordinator.influence``."""
    max_update_norm: float = 0.0
    """The fixed norm bound; with ``adaptive``, an absolute ceiling when positive."""
    norm_factor: float = 4.0
    """Adaptive bound: this many times the recent median norm (or, while warming up, the global state's norm)."""
    norm_window: int = 64
    """Adaptive bound: accepted updates whose norms form the median."""
    norm_warmup: int = 5
    """Adaptive bound: norms needed before the median is used."""
    max_num_samples: int = 100_000
    """Absolute cap on the sample count an update is weighted with."""
    sample_factor: float = 4.0
    """A device's sample count is capped at this many times the median of the other devices' last counts."""
    devices: tuple[str, ...] = ()
    """Devices accepted when ``allow_unknown_devices`` is false."""
    max_updates_per_minute: float = 0.0
    """Per-device rate limit (token bucket, burst of the same size; 0 = off)."""
    rate_burst: int = 0
    """Updates a device may send at once before the rate applies (0 = one minute's worth)."""

    def __post_init__(self) -> None:
        if self.norm_bound not in ("adaptive", "fixed", "off"):
            raise ConfigError(f"limits.norm_bound must be adaptive, fixed or off, got {self.norm_bound!r}")
        if self.norm_bound == "fixed" and self.max_update_norm <= 0:
            raise ConfigError("limits.norm_bound = 'fixed' needs a positive limits.max_update_norm")
        if self.norm_factor <= 1.0 or self.sample_factor < 1.0:
            raise ConfigError(
                f"limits.norm_factor must be above 1 and limits.sample_factor at least 1, got {self.norm_factor}, {self.sample_factor}"
            )
        if self.norm_window < 1 or self.norm_warmup < 1 or self.max_num_samples < 1:
            raise ConfigError("limits.norm_window, limits.norm_warmup and limits.max_num_samples must be at least 1")

    @property
    def lab_mode(self) -> bool:
        """Whether unsigned or unenrolled updates are accepted: fine on a lab bench, never in production."""
        return self.allow_unknown_devices or not self.require_signatures


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
    cohorts: CohortConfig = field(default_factory=CohortConfig)
    """Invite devices to train, at most ``concurrency`` at once (``docs/cohorts.md``)."""
    secagg: SecureConfig = field(default_factory=SecureConfig)
    """Securely aggregate every cohort: the coordinator learns only each cohort's sum (``docs/secure-aggregation.md``)."""
    site: SiteConfig = field(default_factory=SiteConfig)
    """Run as a site aggregator of a root (``docs/sites.md``): follow its versions, forward partials."""
    downlink: CodecConfig = field(default_factory=lambda: DEFAULT_DOWNLINK)
    """Codec of the global deltas published each version (with error feedback at the coordinator)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Score global versions on held-out text in a child process (off unless ``eval.data_dir``)."""
    keep_versions: int = 20
    """Snapshot files kept on disk; older versions keep their ledger rows."""
    decoder_process: bool = True
    """Decode updates in a child process, ahead of the worker (``coordinator/decoder.py``)."""
    snapshot_zstd_level: int = 1
    """zstd level of the retained snapshot. fp32 weights barely compress: on SmolLM2's LoRA state
    level 1 saves 6% in 1.6 ms, level 3 saves 7% in 3.1 ms, and a snapshot is built every version."""
    heartbeat_s: float = 10.0
    metrics_port: int = 0
    """Port of the Prometheus ``/metrics`` endpoint (0 = off)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds to."""
    quarantine_max_files: int = 100
    """Messages whose handling failed, kept in ``<state_dir>/quarantine`` for inspection (oldest dropped)."""

    def __post_init__(self) -> None:
        try:
            check_id(self.fleet, "fleet")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if self.dp.enabled and self.strategy.kind != "fedbuff":
            raise ConfigError(f"dp.enabled needs strategy.kind = 'fedbuff' (DP-FedBuff), got {self.strategy.kind!r}")
        if self.dp.enabled and self.strategy.robust.rule != "none":
            raise ConfigError("dp.enabled replaces robust aggregation (clipping is the bound); set strategy.robust.rule = 'none'")
        s, c = self.strategy, self.cohorts
        if c.enabled and self.dp.enabled and (c.size or s.buffer_size) != s.buffer_size:
            raise ConfigError(
                f"dp.enabled with cohorts needs cohorts.size = strategy.buffer_size ({s.buffer_size}), or 0: each cohort's "
                f"updates are one DP buffer, which is what the amplification by sampling is claimed for; got {c.size}"
            )
        if c.enabled and s.kind == "fedavg" and not 1 <= s.round_participants <= c.concurrency:
            raise ConfigError(
                "cohorts with strategy.kind = 'fedavg' need strategy.round_participants in 1..cohorts.concurrency "
                f"({c.concurrency}): a round must wait for invited devices only, got {s.round_participants}"
            )
        if self.secagg.enabled:
            self._check_secagg()
        if self.site.enabled and (self.dp.enabled or s.robust.rule != "none"):
            raise ConfigError(
                "site.id with dp.enabled or a robust rule: a site forwards sums, which the root cannot clip or inspect per device"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.keep_versions < 2:
            raise ConfigError(f"keep_versions must be at least 2, got {self.keep_versions}")

    def _check_secagg(self) -> None:
        s, c, a = self.strategy, self.cohorts, self.secagg
        if not c.enabled:
            raise ConfigError("secagg.enabled needs cohorts.enabled: secure aggregation runs over cohorts")
        if not MIN_MEMBERS <= c.size <= 1000:
            raise ConfigError(f"secagg.enabled needs cohorts.size set to {MIN_MEMBERS}..1000 members, got {c.size}")
        if c.deadline_s < 5 * a.round_s:
            raise ConfigError(
                f"secagg.enabled needs cohorts.deadline_s >= 5 * secagg.round_s ({5 * a.round_s:g} s): four rounds and training fit in it"
            )
        if self.dp.enabled:
            raise ConfigError("secagg.enabled with dp.enabled: central DP adds noise to updates the coordinator no longer sees")
        if s.robust.rule != "none":
            raise ConfigError("secagg.enabled hides each update, so robust rules cannot inspect them; set strategy.robust.rule = 'none'")
        if self.limits.lab_mode:
            raise ConfigError(
                "secagg.enabled needs every device enrolled and signing: "
                "limits.allow_unknown_devices = false, limits.require_signatures = true"
            )


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
    b = cfg.broker
    tls = {k: None if getattr(b, k) is None else str((base / str(getattr(b, k))).resolve()) for k in ("cafile", "certfile", "keyfile")}
    evaluation = replace(cfg.eval, data_dir=str((base / cfg.eval.data_dir).resolve())) if cfg.eval.enabled else cfg.eval
    return replace(
        cfg,
        state_dir=str((base / cfg.state_dir).resolve()),
        model=replace(cfg.model, source=source),
        eval=evaluation,
        broker=replace(b, **tls),  # type: ignore[arg-type]
    )
