"""In-process federated simulation: N virtual devices with the real model, data pipeline, codec
and aggregation engine, and no broker.

    from fedge_lab.simulation import SimulationConfig, simulate
    result = simulate(SimulationConfig(devices=1000, versions=100))

One model is shared. Each virtual device keeps only its own state: its shard of a non-IID
corpus (device ``i`` holds a slice of domain ``i mod D``), its RNG, its error-feedback
residual and its speed. Time is virtual: a device's local round takes
``local_steps * step_s * speed`` seconds, at most ``concurrency`` devices train at once
(FedBuff's C), and a device that finishes uploads, then the next idle device starts on
the version current at that moment. A round of training is real: the shared model loads
the device's base version, trains, and the delta goes through the device's codec, as
``fedge-agent`` does; the coordinator side is :class:`coordinator.engine.Engine` and
:func:`coordinator.downlink.next_version`, as ``fedge-coordinator serve`` does.
"""

from __future__ import annotations

import heapq
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compression import CodecConfig
from coordinator.config import DEFAULT_DOWNLINK, ModelSpecConfig
from coordinator.initial import initial_state
from coordinator.strategy import StrategyConfig
from edge_agent.config import TrainConfig
from edge_agent.data import LocalData, build_blocks
from edge_agent.model import attach_lora, load_base, set_trainable
from edge_agent.train import evaluate
from fedge_lab.corpus import corpus_domains
from fedge_lab.virtual import ModelIO, SimCoordinator, VirtualDevice


@dataclass(frozen=True)
class SimulationConfig:
    devices: int = 100
    model: str = "tiny"
    """``tiny`` (built from the corpus, no download), ``smollm2``, or a model directory or .gguf file."""
    corpus: str = "pydoc"
    strategy: StrategyConfig = field(default_factory=lambda: StrategyConfig(kind="fedbuff", buffer_size=10, staleness="polynomial"))
    uplink: CodecConfig = field(default_factory=CodecConfig)
    downlink: CodecConfig = DEFAULT_DOWNLINK
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=2, seq_len=64, local_steps=2, lr=3e-3, threads=1, gradient_checkpointing=False, loss_chunk_tokens=0
        )
    )
    lora_r: int = 4
    concurrency: int = 20
    """Devices training at once."""
    versions: int = 20
    """Stop after this many versions."""
    max_updates: int = 0
    """Stop after this many uploads whatever happened (0: 20 x versions x buffer_size)."""
    speeds: tuple[float, ...] = (1.0, 3.0, 10.0)
    """Device ``i`` is ``speeds[i % len(speeds)]`` times slower than the fastest."""
    step_s: float = 1.0
    """Virtual seconds per local step of the fastest device."""
    eval_every: int = 1
    eval_devices: int = 30
    """Held-out loss over this many devices' held-out blocks (the same devices every time)."""
    eval_blocks: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.concurrency < 1 or self.versions < 1:
            raise ValueError("devices, concurrency and versions must be at least 1")
        if not self.speeds or min(self.speeds) < 1.0:
            raise ValueError(f"speeds must be a non-empty tuple of factors >= 1, got {self.speeds}")


@dataclass(frozen=True)
class VersionMetrics:
    version: int
    time_s: float
    """Virtual time at which it was made."""
    updates: int
    """Updates it was made from."""
    mean_staleness: float
    loss: float | None
    """Mean held-out loss of the evaluation devices (None between evaluations)."""
    bytes_down: int


@dataclass
class SimulationResult:
    devices: int
    versions: list[VersionMetrics]
    updates: int
    """Uploads made."""
    rejected: dict[str, int]
    bytes_up: int
    seconds: float
    """Wall-clock seconds of the whole simulation."""
    peak_rss_mb: float
    initial_loss: float
    participants: int
    """Devices that uploaded at least once."""

    @property
    def final_loss(self) -> float | None:
        losses = [v.loss for v in self.versions if v.loss is not None]
        return losses[-1] if losses else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "versions": len(self.versions),
            "updates": self.updates,
            "participants": self.participants,
            "rejected": self.rejected,
            "bytes_up": self.bytes_up,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "by_version": [vars(v) for v in self.versions],
        }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def shard_corpus(corpus: str, tokenizer: Any, n: int, seq_len: int, seed: int) -> list[LocalData]:
    """Device ``i`` gets every ``ceil(n / D)``-th training block of domain ``i mod D`` (non-IID by topic),
    and likewise of its held-out blocks (shared among the domain's devices when there are fewer)."""
    domains = list(corpus_domains(corpus).values())
    per_domain = [build_blocks(list(topics.values()), tokenizer, seq_len, 0.1, seed=seed) for topics in domains]
    out = []
    for i in range(n):
        d = per_domain[i % len(domains)]
        members = (n - i % len(domains) + len(domains) - 1) // len(domains)
        j = i // len(domains)
        train, held = d.train[j::members], d.heldout[j::members]
        if len(held) == 0:  # more devices than held-out blocks: devices of a domain share them (never trained on)
            held = d.heldout[[j % len(d.heldout)]]
        if len(train) == 0:
            raise ValueError(
                f"{n} devices are too many for corpus {corpus!r} at seq_len {seq_len}: device {i} would get no "
                f"training block; use fewer devices or a shorter seq_len"
            )
        out.append(LocalData(train=train, heldout=held, num_files=1))
    return out


def build_model(cfg: SimulationConfig, workdir: Path) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """The shared model with its adapters at version 0, its tokenizer, and version 0's tensors."""
    source = cfg.model
    if source == "tiny":
        from edge_agent.tiny import build_tiny_model

        texts = [t for topics in corpus_domains(cfg.corpus).values() for t in topics.values()]
        source = str(build_tiny_model(workdir / "tiny", texts))
    _spec, v0 = initial_state(ModelSpecConfig(source=source, lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r))
    base, tokenizer = load_base(source, "int8")
    model = attach_lora(base, _spec)
    set_trainable(model, v0)
    return model, tokenizer, v0


def simulate(cfg: SimulationConfig, progress: Callable[[int, int], None] | None = None) -> SimulationResult:
    """Run the fleet until ``cfg.versions`` versions; ``progress(versions, updates)`` after each upload."""
    import torch

    t0 = time.monotonic()
    torch.set_num_threads(cfg.train.threads)
    workdir = Path(tempfile.mkdtemp(prefix="fedge-sim-"))
    model, tokenizer, v0 = build_model(cfg, workdir)
    io = ModelIO(model)
    datas = shard_corpus(cfg.corpus, tokenizer, cfg.devices, cfg.train.seq_len, cfg.seed)
    devices = [
        VirtualDevice(f"sim-{i:05d}", datas[i], np.random.default_rng([cfg.seed, i]), cfg.speeds[i % len(cfg.speeds)])
        for i in range(cfg.devices)
    ]
    del datas
    pick = np.random.default_rng([cfg.seed, 1 << 20])
    eval_set = [devices[i].data for i in sorted(pick.choice(cfg.devices, size=min(cfg.eval_devices, cfg.devices), replace=False))]

    def loss_of(state: dict[str, np.ndarray]) -> float:
        io.load(state)
        return float(np.mean([evaluate(model, d, cfg.eval_blocks, cfg.train.batch_size) for d in eval_set]))

    coord = SimCoordinator(cfg.strategy, v0, cfg.downlink)
    result = SimulationResult(cfg.devices, [], 0, {}, 0, 0.0, 0.0, loss_of(v0), 0)
    uploaded: set[int] = set()
    limit = cfg.max_updates or 20 * cfg.versions * max(cfg.strategy.buffer_size, 1)

    order = list(pick.permutation(cfg.devices))
    running: list[tuple[float, int]] = []

    def start(now: float) -> None:
        i = int(order.pop(0))
        devices[i].base = coord.version
        heapq.heappush(running, (now + cfg.train.local_steps * cfg.step_s * devices[i].speed, i))

    for _ in range(min(cfg.concurrency, cfg.devices)):
        start(0.0)
    while running and len(result.versions) < cfg.versions and result.updates < limit:
        now, i = heapq.heappop(running)
        dev = devices[i]
        order.append(i)  # idle again: it waits for its next turn
        base_state = coord.base_state(dev.base)
        if base_state is not None:
            up = dev.train(io, base_state, dev.base, cfg.train, cfg.uplink)
            result.updates += 1
            result.bytes_up += up.wire_bytes
            uploaded.add(i)
            made = coord.submit(up, now)
        else:
            coord.rejected["too_stale"] += 1  # its base version was dropped: staler than the strategy takes
            made = []
        for m in made or coord.poll(now):
            last = len(result.versions) + 1 == cfg.versions
            loss = loss_of(m.state) if m.version % cfg.eval_every == 0 or last else None
            result.versions.append(VersionMetrics(m.version, now, m.updates, m.mean_staleness, loss, m.bytes_down))
        if progress is not None:
            progress(len(result.versions), result.updates)
        start(now)
    result.rejected = dict(coord.rejected)
    result.participants = len(uploaded)
    result.seconds = time.monotonic() - t0
    result.peak_rss_mb = peak_rss_mb()
    return result
