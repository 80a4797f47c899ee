"""Aggregation maths as pure functions over numpy arrays.

Every update ``i`` carries ``delta_i = local_i - x_{base_i}``, its sample count ``n_i``
and its staleness ``tau_i = current - base_i``. The strategies:

- **FedAsync** (Xie et al., 2019): each update is applied on arrival,
  ``x <- x + alpha * s(tau_i) * delta_i``.
- **FedBuff** (Nguyen et al., 2022): updates wait in a buffer of ``K``; when it is full,
  ``x <- x + eta_g * sum_i p_i * s(tau_i) * delta_i``.
- **FedAvg** (McMahan et al., 2017), synchronous rounds of devices (one update per device
  per round): ``x <- x + eta_g * sum_i p_i * s(tau_i) * delta_i``; an update is on the
  round's own version (``tau = 0``) unless a straggler's, up to ``round_late`` rounds old.
- **FedAdam**, **FedYogi** (Reddi et al., 2021): FedBuff's buffers, stepped by an adaptive
  server optimizer (:mod:`coordinator.strategies`).

``p_i`` is ``n_i / sum_j n_j`` with sample weighting (``weight_by_samples``), else
``1 / K``. Aggregation is per tensor: the sums and the sample normalisation run over the
updates that carry the tensor, so a mixed fleet (LoRA and embedding devices) moves each
tensor by its own contributors only, and a tensor no update carries does not move.

``s(tau)`` is the staleness weight: ``constant`` (1), ``polynomial`` ``(1 + tau)^-a``, or
``hinge`` (1 up to ``b``, then ``1 / (a (tau - b) + 1)``). Updates staler than
``max_staleness`` are rejected before they reach these functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from compression.frame import SparseTensor, Tensors
from coordinator.robust import RobustConfig, coordinate_median, multi_krum_select, trimmed_mean

BUILTIN_KINDS = ("fedasync", "fedbuff", "fedavg", "fedadam", "fedyogi")
"""The built-in strategies; ``strategy.kind`` may also name a user class as ``"package.module:Class"``."""
USER_KIND = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ServerOptConfig:
    """FedAdam and FedYogi (Reddi et al., 2021): the adaptive server step over each buffer's mean delta
    (``[strategy.optimizer]``)."""

    lr: float = 0.01
    """Server learning rate (eta)."""
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """Adaptivity: added to ``sqrt(v)``; about the size of a typical coordinate of a mean delta or below."""

    def __post_init__(self) -> None:
        if not 0.0 < self.lr <= 10.0:
            raise ValueError(f"strategy.optimizer.lr must be in (0, 10], got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"strategy.optimizer.beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0.0:
            raise ValueError(f"strategy.optimizer.tau must be positive, got {self.tau}")


@dataclass(frozen=True)
class StrategyConfig:
    """How the coordinator aggregates (``[strategy]`` in its config)."""

    kind: str = "fedasync"
    """``fedasync``, ``fedbuff``, ``fedavg``, ``fedadam``, ``fedyogi``, or a user strategy ``"pkg.module:Class"``
    (see ``docs/strategies.md``)."""
    alpha: float = 0.6
    """FedAsync mixing rate: how much of one fresh update enters the global model."""
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = 0.5
    """Exponent of the polynomial weight, or slope of the hinge."""
    b: int = 4
    """Hinge: staleness up to ``b`` has full weight."""
    max_staleness: int = 64
    """Updates staler than this are rejected (``too_stale``); FedAvg uses ``round_late``."""
    buffer_size: int = 10
    """FedBuff: updates per aggregation (K)."""
    server_lr: float = 1.0
    """FedBuff and FedAvg: server learning rate (eta_g)."""
    weight_by_samples: bool = True
    """Weight updates by their sample counts (else equally)."""
    round_deadline_s: float = 120.0
    """FedAvg: a round closes at this deadline if ``min_participants`` have reported."""
    min_participants: int = 2
    """FedAvg: updates needed to close a round (it waits past the deadline for them)."""
    round_participants: int = 0
    """FedAvg: close a round as soon as this many devices reported (0 = the devices online at its start)."""
    round_late: int = 1
    """FedAvg: an update trained on a version up to this many rounds old (a straggler's) joins the open
    round, weighted by ``s(tau)``; older ones are refused as ``too_stale``."""
    robust: RobustConfig = field(default_factory=RobustConfig)
    """FedBuff and FedAvg: robust aggregation of each buffer (``[strategy.robust]``)."""
    optimizer: ServerOptConfig = field(default_factory=ServerOptConfig)
    """FedAdam and FedYogi: the server optimizer (``[strategy.optimizer]``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """A user strategy's own settings (``[strategy.options]``), passed to its constructor."""

    def __post_init__(self) -> None:
        if self.kind not in BUILTIN_KINDS and not USER_KIND.match(self.kind):
            raise ValueError(f"strategy.kind must be one of {', '.join(BUILTIN_KINDS)} or 'package.module:Class', got {self.kind!r}")
        if self.staleness not in ("constant", "polynomial", "hinge"):
            raise ValueError(f"strategy.staleness must be constant, polynomial or hinge, got {self.staleness!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"strategy.alpha must be in (0, 1], got {self.alpha}")
        if self.a < 0:
            raise ValueError(f"strategy.a must be non-negative, got {self.a}")
        if self.b < 0 or self.max_staleness < 0:
            raise ValueError("strategy.b and strategy.max_staleness must be non-negative")
        if not 1 <= self.buffer_size <= 10_000:
            raise ValueError(f"strategy.buffer_size must be in 1..10000, got {self.buffer_size}")
        if not 0.0 < self.server_lr <= 10.0:
            raise ValueError(f"strategy.server_lr must be in (0, 10], got {self.server_lr}")
        if self.round_late < 0:
            raise ValueError(f"strategy.round_late must be non-negative, got {self.round_late}")
        if self.round_deadline_s <= 0 or self.min_participants < 1 or self.round_participants < 0:
            raise ValueError("strategy.round_deadline_s and strategy.min_participants must be positive")

    @property
    def effective_max_staleness(self) -> int:
        return self.round_late if self.kind == "fedavg" else self.max_staleness


FedAsyncConfig = StrategyConfig
"""The name under which earlier code knew the strategy settings."""


@dataclass(frozen=True)
class WeightedUpdate:
    """What aggregation needs of one accepted update. A delta tensor is a dense array or a
    :class:`~compression.frame.SparseTensor` (as decoded from the wire: no dense copy)."""

    delta: Mapping[str, np.ndarray | SparseTensor]
    num_samples: int
    staleness: int


def staleness_weight(tau: int, cfg: StrategyConfig) -> float:
    """``s(tau)``: 1 for a fresh update, decreasing with staleness."""
    if tau < 0:
        raise ValueError(f"staleness must be non-negative, got {tau}")
    if cfg.staleness == "constant":
        return 1.0
    if cfg.staleness == "polynomial":
        return float((1.0 + tau) ** (-cfg.a))
    if tau <= cfg.b:
        return 1.0
    return float(1.0 / (cfg.a * (tau - cfg.b) + 1.0))


def fedasync_step(delta: Mapping[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """The global step of one update: ``weight * delta`` for each tensor it carries.

    The caller adds it to the global state (through the downlink codec, so that devices
    can follow exactly); tensors the update does not carry do not move.
    """
    w = np.float32(weight)
    return {name: (w * np.asarray(d, dtype=np.float32)).astype(np.float32) for name, d in delta.items()}


def fedasync_weight(tau: int, cfg: StrategyConfig) -> float:
    """FedAsync's weight of one update: ``alpha * s(tau)``."""
    return cfg.alpha * staleness_weight(tau, cfg)


def update_weights(updates: Sequence[WeightedUpdate], name: str, cfg: StrategyConfig) -> list[tuple[int, float]]:
    """``(index, weight)`` of each update carrying tensor ``name``: ``eta_g * p_i * s(tau_i)``."""
    carriers = [i for i, u in enumerate(updates) if name in u.delta]
    if not carriers:
        return []
    if cfg.weight_by_samples:
        total = float(sum(max(updates[i].num_samples, 0) for i in carriers))
        shares = [max(updates[i].num_samples, 0) / total if total > 0 else 1.0 / len(carriers) for i in carriers]
    else:
        shares = [1.0 / len(carriers)] * len(carriers)
    out = []
    for i, p in zip(carriers, shares, strict=True):
        s = staleness_weight(updates[i].staleness, cfg)
        out.append((i, cfg.server_lr * p * s))
    return out


def _dense(d: np.ndarray | SparseTensor) -> np.ndarray:
    return d.to_dense().reshape(-1) if isinstance(d, SparseTensor) else np.asarray(d, dtype=np.float32).reshape(-1)


def _update_norm(u: WeightedUpdate) -> float:
    total = 0.0
    for d in u.delta.values():
        v = d.values if isinstance(d, SparseTensor) else np.asarray(d, dtype=np.float32)
        total += float(np.square(v, dtype=np.float64).sum())
    return float(np.sqrt(total))


def buffered_step(updates: Sequence[WeightedUpdate], cfg: StrategyConfig) -> dict[str, np.ndarray]:
    """The global step of a full FedBuff buffer (or, with ``kind == "fedavg"``, of a round)."""
    return aggregate_buffer(updates, cfg)[0]


def aggregate_buffer(updates: Sequence[WeightedUpdate], cfg: StrategyConfig) -> tuple[dict[str, np.ndarray], list[float]]:
    """The global step of a buffer (or round), and the weight each update really got in it.

    The weight of update ``i`` is ``eta_g * p_i * s(tau_i)`` (its largest over the tensors it
    carries), times its norm-bound scale; 0 for an update Multi-Krum dropped. Trimmed mean
    and coordinate median weigh no update linearly: each update is recorded with its nominal
    ``eta_g * s(tau_i) / n``.
    """
    if not updates:
        raise ValueError("cannot aggregate an empty buffer")
    rule = cfg.robust.rule
    if rule in ("trimmed_mean", "median"):
        nominal = [cfg.server_lr * staleness_weight(u.staleness, cfg) / len(updates) for u in updates]
        return _rank_step(updates, cfg), nominal
    index = list(range(len(updates)))
    if rule == "multi_krum":
        index = krum_keep(updates, cfg.robust.krum_f, cfg.robust.krum_m)
    kept = [updates[i] for i in index]
    scale = [1.0] * len(kept)
    if rule == "norm_bound":
        scale = [min(1.0, cfg.robust.clip / max(_update_norm(u), 1e-12)) for u in kept]
    names = sorted({n for u in kept for n in u.delta})
    weights = [0.0] * len(updates)
    if all(len(u.delta) == len(names) for u in kept):
        # Every update carries every tensor (one kind of device): one weighted sum over all.
        linear = [wi * scale[i] for (i, wi) in update_weights(kept, names[0], cfg)]
        for i, wi in enumerate(linear):
            weights[index[i]] = wi
        return _summed(kept, linear, names), weights
    step: dict[str, np.ndarray] = {}
    for name in names:
        carriers = update_weights(kept, name, cfg)
        shape = kept[carriers[0][0]].delta[name].shape
        numel = int(np.prod(shape, dtype=np.int64))
        dense = np.zeros(numel, dtype=np.float64)
        sparse_idx, sparse_val = [], []
        for i, w in carriers:
            d = kept[i].delta[name]
            w *= scale[i]
            weights[index[i]] = max(weights[index[i]], w)
            if isinstance(d, SparseTensor) and d.indices is not None:
                sparse_idx.append(d.indices)
                sparse_val.append(w * d.values.astype(np.float64))
            else:
                values = d.values if isinstance(d, SparseTensor) else np.asarray(d, dtype=np.float32)
                dense += w * values.reshape(-1).astype(np.float64)
        if sparse_idx:
            # One weighted bincount per tensor sums every sparse update at once.
            dense += np.bincount(np.concatenate(sparse_idx), weights=np.concatenate(sparse_val), minlength=numel)
        step[name] = dense.astype(np.float32).reshape(shape)
    return step, weights


def _summed(updates: Sequence[WeightedUpdate], weights: Sequence[float], names: Sequence[str]) -> dict[str, np.ndarray]:
    """``sum_i w_i * delta_i`` of updates that all carry exactly ``names``, with the tensors laid
    end to end so that the sparse parts of every update go into one weighted bincount."""
    shapes = {n: tuple(updates[0].delta[n].shape) for n in names}
    offsets, total = {}, 0
    for n in names:
        offsets[n] = total
        total += math.prod(shapes[n])
    dense = np.zeros(total, dtype=np.float64)
    sparse_idx, sparse_val = [], []
    has_dense = False
    layouts: dict[tuple[Any, ...], np.ndarray] = {}
    for u, w in zip(updates, weights, strict=True):
        packed = u.delta.packed if isinstance(u.delta, Tensors) else None
        if packed is not None:
            # As decoded: every record's indices shifted by its tensor's offset, in two operations.
            key = (packed.names, packed.shapes)
            starts = layouts.get(key)
            if starts is None:
                for n, shape in zip(packed.names, packed.shapes, strict=True):
                    if shape != shapes[n]:
                        raise ValueError(f"tensor {n!r} has shape {shape} in one update and {shapes[n]} in another")
                starts = layouts[key] = np.array([offsets[n] for n in packed.names], dtype=np.int64)
            sparse_idx.append(packed.indices + np.repeat(starts, np.diff(packed.bounds)))
            sparse_val.append(w * packed.values.astype(np.float64))
            continue
        for n, d in u.delta.items():
            if tuple(d.shape) != shapes[n]:
                raise ValueError(f"tensor {n!r} has shape {tuple(d.shape)} in one update and {shapes[n]} in another")
            off = offsets[n]
            if isinstance(d, SparseTensor) and d.indices is not None:
                sparse_idx.append(d.indices + off)
                sparse_val.append(w * d.values.astype(np.float64))
            else:
                values = d.values if isinstance(d, SparseTensor) else np.asarray(d, dtype=np.float32)
                flat = values.reshape(-1)
                dense[off : off + flat.size] += w * flat.astype(np.float64)
                has_dense = True
    if sparse_idx:
        summed: np.ndarray = np.bincount(np.concatenate(sparse_idx), weights=np.concatenate(sparse_val), minlength=total)
        dense = dense + summed if has_dense else summed
    flat32 = dense.astype(np.float32)
    ends = dict(zip(names, [*list(offsets.values())[1:], total], strict=True))
    return {n: flat32[offsets[n] : ends[n]].reshape(shapes[n]) for n in names}


def krum_keep(updates: Sequence[WeightedUpdate], f: int, m: int = 0) -> list[int]:
    """Multi-Krum over whole updates, within each group of updates that carry the same tensors
    (a mixed fleet's LoRA and embedding devices are compared among themselves)."""
    groups: dict[frozenset[str], list[int]] = {}
    for i, u in enumerate(updates):
        groups.setdefault(frozenset(u.delta), []).append(i)
    keep: list[int] = []
    for names, members in groups.items():
        if len(members) <= f + 2:
            keep += members  # too few to judge: kept (the norm bound is the defence for small groups)
            continue
        rows = np.stack([np.concatenate([_dense(updates[i].delta[n]) for n in sorted(names)]) for i in members])
        keep += [members[int(j)] for j in multi_krum_select(rows, f, m)]
    return sorted(keep)


def _rank_step(updates: Sequence[WeightedUpdate], cfg: StrategyConfig) -> dict[str, np.ndarray]:
    """Trimmed mean or coordinate median, per tensor, of the staleness-weighted deltas."""
    step: dict[str, np.ndarray] = {}
    for name in sorted({n for u in updates for n in u.delta}):
        carriers = [u for u in updates if name in u.delta]
        shape = carriers[0].delta[name].shape
        rows = np.stack([_dense(u.delta[name]) * np.float32(staleness_weight(u.staleness, cfg)) for u in carriers])
        agg = trimmed_mean(rows, cfg.robust.trim) if cfg.robust.rule == "trimmed_mean" else coordinate_median(rows)
        step[name] = (np.float32(cfg.server_lr) * agg).astype(np.float32).reshape(shape)
    return step
