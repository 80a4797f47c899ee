"""The two federated experiments the codec is judged by, and the candidates they compare.

- **Short synchronous run**: Flower's FedAvg baseline as fedge runs it with
  ``strategy.kind = "fedavg"``: 3 devices, 5 rounds of 5 local AdamW steps (batch 4,
  seq 128, lr 2e-4). Judged round by round: the share of the dense run's loss
  reduction that a codec keeps.
- **Long asynchronous run**: FedAsync (alpha 0.6, polynomial staleness) over 20 ticks
  of 3 updates, 4 local steps (batch 2, seq 128, lr 3e-3). Judged by the final loss and
  the worst tick against the dense run.

Both run in process (``benchmarks.fedsim``) with the daemons' model, data and codec code,
fixed seeds and no broker. A candidate is an uplink codec, a downlink codec and, for
B-only sharing, frozen LoRA A factors, or, for Fed-SB, an r x r core between factors
calibrated on the other corpus (``benchmarks.fedsb``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmarks import fedsb
from benchmarks.fedsim import RunResult, SimModel, run_federated, run_rounds
from compression import CodecConfig, protocol
from compression.protocol import UpdateHeader
from coordinator.config import DEFAULT_DOWNLINK
from edge_agent.config import TrainConfig

DEFAULT_UP = CodecConfig()
DEFAULT_DOWN = DEFAULT_DOWNLINK
OLD_UP = CodecConfig(topk_fraction=0.02, values="int4")
OLD_DOWN = CodecConfig(topk_fraction=0.02, values="int8")
SUPPORT_DOWN = CodecConfig(topk_fraction=1.0, values="int8")
"""A downlink that keeps every non-zero of the step (int8 values, error feedback)."""


@dataclass(frozen=True)
class Candidate:
    name: str
    uplink: CodecConfig | None
    downlink: CodecConfig | None
    freeze_a: bool = False
    secagg: str = ""
    """Whether it suits secure aggregation (see :func:`secagg_note`)."""
    core_rank: int = 0
    """Fed-SB: train an r x r core per LoRA module instead of the adapters (0 = off)."""
    refresh_every: int = 0
    """Fed-SB: fold the cores in and recalibrate the factors every this many ticks of the long run (0 = never)."""
    long_lr: float = 0.0
    """The long run's local learning rate (0: the devices' usual, ``LONG_TRAIN.lr``)."""


def rotating(fraction: float, values: str = "int4", rescale: bool = True) -> CodecConfig:
    return CodecConfig(topk_fraction=fraction, values=values, selection="rotating", rescale=rescale)  # type: ignore[arg-type]


def secagg_note(uplink: CodecConfig | None) -> str:
    """Whether an uplink codec suits secure aggregation (masked sums of equal-length vectors)."""
    if uplink is None or (uplink.topk_fraction >= 1.0 and uplink.values in ("fp32", "fp16", "int8", "int4")):
        return "yes: one dense vector"
    if uplink.topk_fraction >= 1.0:
        return "partly: dense, but per-device scales"
    if uplink.selection == "rotating":
        return "yes: the same coordinates on every device of a version"
    return "no: device-specific indices"


def candidate(
    name: str,
    uplink: CodecConfig | None,
    downlink: CodecConfig | None,
    freeze_a: bool = False,
    core_rank: int = 0,
    refresh_every: int = 0,
    long_lr: float = 0.0,
) -> Candidate:
    secagg = "yes: one small dense vector" if core_rank else secagg_note(uplink)
    return Candidate(name, uplink, downlink, freeze_a, secagg, core_rank, refresh_every, long_lr)


DENSE = candidate("dense fp32 links", None, None)
DEFAULT = candidate("default", DEFAULT_UP, DEFAULT_DOWN)
CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        candidate("top-2% int4, lossless-support downlink", OLD_UP, SUPPORT_DOWN),
        candidate("top-2% int4, dense fp32 downlink", OLD_UP, None),
        candidate("top-2% int4, per-tensor k", CodecConfig(topk_fraction=0.02, topk_scope="tensor"), OLD_DOWN),
        candidate("top-10% int4", CodecConfig(topk_fraction=0.10), SUPPORT_DOWN),
        candidate("rotating 1/16 sign, rescaled", rotating(1 / 16, "sign"), SUPPORT_DOWN),
        candidate("rotating 1/8 sign, rescaled", rotating(1 / 8, "sign"), SUPPORT_DOWN),
        candidate("rotating 1/4 sign, delayed", rotating(0.25, "sign", rescale=False), SUPPORT_DOWN),
        candidate("dense sign (1 bit)", CodecConfig(topk_fraction=1.0, values="sign"), SUPPORT_DOWN),
        candidate("B only (FFA-LoRA), dense links", None, None, freeze_a=True),
        candidate("Fed-SB core r=12, int4 up, int8 down", CodecConfig(topk_fraction=1.0, values="int4"), SUPPORT_DOWN, core_rank=12),
        candidate("Fed-SB core r=8, int8 up, int8 down", CodecConfig(topk_fraction=1.0, values="int8"), SUPPORT_DOWN, core_rank=8),
        candidate(
            "Fed-SB core r=12, refreshed every 4 ticks",
            CodecConfig(topk_fraction=1.0, values="int4"),
            SUPPORT_DOWN,
            core_rank=12,
            refresh_every=4,
        ),
        *(
            candidate(
                f"Fed-SB core r=12, long-run lr {lr:g}",
                CodecConfig(topk_fraction=1.0, values="int4"),
                SUPPORT_DOWN,
                core_rank=12,
                long_lr=lr,
            )
            for lr in (1e-3, 1e-2)
        ),
    )
}


def envelope_overhead(frame: bytes) -> int:
    """Bytes a signed update envelope adds around ``frame`` (a realistic header, an Ed25519 signature)."""
    header = UpdateHeader(
        device="pi-livingroom-01",
        seq=123456,
        update_id="pi-livingroom-01-123456-0123abcd",
        base_version=123456,
        num_samples=20,
        timestamp=1_800_000_000.123456,
        frame_sha256=hashlib.sha256(frame).hexdigest(),
        train_loss=2.8765432109876543,
    )
    return len(protocol.encode_envelope(header, frame, signer=lambda _msg: bytes(64))) - len(frame)


@contextmanager
def frozen_a(sim: SimModel, freeze: bool) -> Iterator[None]:
    """Freeze (or not) the LoRA A factors for one run: B-only sharing trains only B."""
    params = [p for n, p in sim.model.named_parameters() if "lora_A" in n]
    try:
        for p in params:
            p.requires_grad_(not freeze)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class Curve:
    """One run: the loss after every round (tick), and the bytes on each link."""

    losses: list[float]
    bytes_up: int
    updates: int
    dense_bytes_up: int
    bytes_down: int
    versions: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.dense_bytes_up / max(self.bytes_up, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": self.losses,
            "bytes_up": self.bytes_up,
            "updates": self.updates,
            "bytes_up_per_update": self.bytes_up / max(self.updates, 1),
            "dense_bytes_up": self.dense_bytes_up,
            "ratio_vs_dense_fp32": self.ratio,
            "bytes_down": self.bytes_down,
            "downlink_bytes_per_version": self.bytes_down / max(self.versions, 1),
            "seconds": self.seconds,
        }


SHORT_TRAIN = TrainConfig(batch_size=4, seq_len=128, local_steps=5, lr=2e-4, threads=2, gradient_checkpointing=False, loss_chunk_tokens=0)
LONG_TRAIN = TrainConfig(batch_size=2, seq_len=128, local_steps=4, lr=3e-3, threads=2, gradient_checkpointing=False, loss_chunk_tokens=0)


@contextmanager
def trained_set(sim: SimModel, cand: Candidate, calib: Sequence[Any] | None) -> Iterator[fedsb.CoreRun | None]:
    """What the candidate trains: the adapters, B only, or Fed-SB cores calibrated on ``calib``."""
    with ExitStack() as stack:
        stack.enter_context(frozen_a(sim, cand.freeze_a))
        run = None
        if cand.core_rank:
            if not calib:
                raise ValueError(f"{cand.name} needs calibration text (the other corpus)")
            factors = fedsb.calibration_factors(sim, calib, cand.core_rank)
            run = stack.enter_context(fedsb.core_adapter(sim, factors, cand.core_rank))
        yield run


def short_run(
    sim: SimModel,
    datas: list[Any],
    cand: Candidate,
    rounds: int,
    progress: Callable[[], None] | None = None,
    calib: Sequence[Any] | None = None,
) -> Curve:
    """The synchronous FedAvg run; ``losses[0]`` is version 0."""
    dense_per_update = sum(v.size * 4 for v in sim.v0.values())
    with trained_set(sim, cand, calib):
        res = run_rounds(sim, datas, cand.name, cand.uplink, cand.downlink, rounds=rounds, train=SHORT_TRAIN, progress=progress)
    return _curve(res, rounds * len(datas), rounds, dense_per_update)


def long_run(
    sim: SimModel,
    datas: list[Any],
    cand: Candidate,
    ticks: int,
    progress: Callable[[], None] | None = None,
    calib: Sequence[Any] | None = None,
) -> Curve:
    """The FedAsync run; ``losses[t]`` after tick ``t + 1``."""
    dense_per_update = sum(v.size * 4 for v in sim.v0.values())
    with trained_set(sim, cand, calib) as core:
        after_tick = None
        if core is not None and cand.refresh_every and calib:
            every, text = cand.refresh_every, calib

            def after_tick(t: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
                return core.refresh(state, text) if (t + 1) % every == 0 and t + 1 < ticks else None

        train = replace(LONG_TRAIN, lr=cand.long_lr) if cand.long_lr else LONG_TRAIN
        res = run_federated(
            sim, datas, cand.name, cand.uplink, cand.downlink, ticks=ticks, train=train, progress=progress, after_tick=after_tick
        )
        if core is not None:
            res.bytes_down += core.factor_bytes  # the new factors, once per refresh
    return _curve(res, ticks * len(datas), ticks * len(datas), dense_per_update)


def _curve(res: RunResult, updates: int, versions: int, dense_per_update: int) -> Curve:
    """A run's curve, with every update's envelope counted on the uplink, against the adapters' dense fp32 size
    (a candidate that trains fewer values is still compared with what the adapters would send)."""
    up = res.bytes_up + updates * envelope_overhead(b"")
    return Curve(res.losses, up, updates, updates * dense_per_update, res.bytes_down, versions, res.seconds)


def kept_reduction(curve: Curve, dense: Curve) -> list[float]:
    """Per round: (L0 - L_r) / (L0 - L_r of the dense run); 1.0 keeps all of the dense run's progress."""
    l0 = dense.losses[0]
    return [(l0 - c) / (l0 - d) if l0 != d else float("nan") for c, d in zip(curve.losses[1:], dense.losses[1:], strict=True)]


def rel_increase(curve: Curve, dense: Curve) -> list[float]:
    """Per tick: (L - L_dense) / L_dense."""
    return [(c - d) / d for c, d in zip(curve.losses, dense.losses, strict=True)]


def mean_abs(values: list[float]) -> float:
    return float(np.mean(np.abs(values))) if values else float("nan")
