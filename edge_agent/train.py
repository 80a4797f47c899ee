"""Local training and held-out evaluation of the adapter on token blocks.

Memory: the frozen base runs with gradient checkpointing (activations of one layer at a
time are recomputed in the backward pass), and the loss over the 49k-token vocabulary is
computed ``loss_chunk_tokens`` positions at a time, each chunk checkpointed too, so the
full ``batch × seq × vocab`` logits never exist at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from edge_agent.config import TrainConfig
from edge_agent.data import LocalData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What one local round did."""

    steps: int
    train_loss: float
    samples: int
    seconds: float


def causal_lm(model: torch.nn.Module) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of the transformer layers on or off (idempotent)."""
    inner = causal_lm(model)
    active = bool(inner.is_activation_checkpointing)
    if enabled and not active:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif not enabled and active:
        inner.activation_checkpointing_disable()


def _ce_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


def lm_loss(model: torch.nn.Module, batch: np.ndarray, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (``[B, T]`` token ids).

    ``chunk_tokens > 0`` computes the output head and the loss that many positions at a
    time; under autograd each chunk is checkpointed, so only one chunk's logits are alive.
    """
    ids = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.int64))
    if chunk_tokens <= 0:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    inner = causal_lm(model)
    hidden = inner.model(input_ids=ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = ids[:, 1:].reshape(-1)
    head = inner.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, y.numel(), chunk_tokens):
        if torch.is_grad_enabled():
            part = checkpoint(_ce_sum, head, h[s : s + chunk_tokens], y[s : s + chunk_tokens], use_reentrant=False)
        else:
            part = _ce_sum(head, h[s : s + chunk_tokens], y[s : s + chunk_tokens])
        total = total + part
    return total / y.numel()


def _idle(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Sleep in short slices, so that a stop request (and the watchdog) is served while idle."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not should_stop():
        time.sleep(min(left, 0.5))


def train_round(
    model: torch.nn.Module,
    data: LocalData,
    cfg: TrainConfig,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] = lambda: False,
) -> RoundResult:
    """Run ``cfg.local_steps`` AdamW steps on the adapter; stops early when ``should_stop()``.

    With ``cfg.fedprox_mu > 0`` the loss gets FedProx's proximal term
    ``mu / 2 * ||w - w_global||^2`` over the trainable tensors, ``w_global`` being their
    values when the round starts; the reported train loss excludes it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    anchors = [p.detach().clone() for p in params] if cfg.fedprox_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    for batch in data.batches(rng, cfg.batch_size, cfg.local_steps):
        if should_stop():
            break
        step_started = time.monotonic()
        loss = lm_loss(model, batch, cfg.loss_chunk_tokens)
        objective = loss
        if anchors:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
            objective = loss + 0.5 * cfg.fedprox_mu * prox
        objective.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if cfg.slowdown > 1.0:
            _idle((cfg.slowdown - 1.0) * (time.monotonic() - step_started), should_stop)
    model.eval()
    return RoundResult(
        steps=len(losses),
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        samples=len(losses) * cfg.batch_size,
        seconds=time.monotonic() - t0,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: LocalData, max_blocks: int, batch_size: int, chunk_tokens: int = 0) -> float:
    """Mean next-token loss over the first ``max_blocks`` held-out blocks."""
    model.eval()
    blocks = data.heldout[:max_blocks]
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        total += float(lm_loss(model, batch, chunk_tokens)) * len(batch)
        count += len(batch)
    return total / max(count, 1)
