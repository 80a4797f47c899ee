"""Local training and held-out evaluation of the adapter on token blocks.

Memory: the frozen base runs with gradient checkpointing (activations of one layer at a
time are recomputed in the backward pass), and the loss over the 49k-token vocabulary is
computed ``loss_chunk_tokens`` positions at a time, each chunk checkpointed too, so the
full ``batch × seq × vocab`` logits never exist at once.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from edge_agent.config import TrainConfig
from edge_agent.data import LocalData, target_mask, token_ids
from edge_agent.privacy import DPSGDConfig

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


def _ce_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma 2 caps its final logits: cap * tanh(logits / cap)
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def backbone(model: torch.nn.Module) -> Any:
    """The decoder stack of a causal LM (``model.model`` for Llama, ``model.transformer`` for GPT-2)."""
    inner = causal_lm(model)
    return getattr(inner, getattr(inner, "base_model_prefix", "model") or "model")


def lm_loss(model: torch.nn.Module, batch: np.ndarray, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (``[B, T]`` token ids) over its targets.

    A negative entry ``-(id + 1)`` is token ``id`` as input only: the loss does not predict
    it (a prompt or a user turn, :mod:`edge_agent.data`), so it adds no gradient. The mean
    is over the predicted positions. ``chunk_tokens > 0`` computes the output head and the
    loss that many positions at a time; under autograd each chunk is checkpointed, so only
    one chunk's logits are alive.
    """
    arr = np.ascontiguousarray(batch, dtype=np.int64)
    keep = target_mask(arr)
    # A block may start with an input-only token and predict every later one: its ids still need decoding.
    ids = torch.from_numpy(token_ids(arr) if (arr < 0).any() else arr)
    if chunk_tokens <= 0 and keep is None:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    inner = causal_lm(model)
    hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = ids[:, 1:].reshape(-1)
    if keep is not None:
        rows = torch.from_numpy(np.flatnonzero(keep.reshape(-1)))
        h, y = h.index_select(0, rows), y.index_select(0, rows)
        if not len(rows):
            return hidden.sum() * 0.0  # nothing to predict in this batch: no loss, no gradient
    head = inner.get_output_embeddings()
    if hasattr(head, "loss_sum"):  # the lean runtime's head fuses the loss over vocabulary blocks (edge_agent.lean)
        return head.loss_sum(h, y) / y.numel()  # type: ignore[no-any-return]
    softcap = float(getattr(inner.config, "final_logit_softcapping", None) or 0.0)
    chunk = chunk_tokens if chunk_tokens > 0 else y.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, y.numel(), chunk):
        if torch.is_grad_enabled() and chunk_tokens > 0:
            part = checkpoint(_ce_sum, head, h[s : s + chunk], y[s : s + chunk], softcap, use_reentrant=False)
        else:
            part = _ce_sum(head, h[s : s + chunk], y[s : s + chunk], softcap)
        total = total + part
    return total / y.numel()


def _idle(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Sleep in short slices, so that a stop request (and the watchdog) is served while idle."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not should_stop():
        time.sleep(min(left, 0.5))


def clipped_gradient(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batch: np.ndarray, clip: float, chunk_tokens: int = 0
) -> tuple[list[torch.Tensor], list[float], float]:
    """The sum over ``batch``'s examples of each one's gradient clipped to ``clip`` in L2 (over
    every tensor in ``params``), each example's unclipped norm, and the mean loss. Per-example
    gradients are exact: one backward pass per example (micro-batches of one)."""
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    norms, losses = [], []
    for i in range(len(batch)):
        loss = lm_loss(model, batch[i : i + 1], chunk_tokens)
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.stack([(g.float() ** 2).sum() for g in grads]).sum().sqrt())
        factor = min(1.0, clip / max(norm, 1e-12)) if math.isfinite(norm) else 0.0  # a non-finite gradient adds nothing
        for t, g in zip(total, grads, strict=True):
            t.add_(g.float(), alpha=factor)
        norms.append(norm)
        losses.append(float(loss.detach()))
    return total, norms, float(np.mean(losses))


def _private_step(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batch: np.ndarray, sgd: DPSGDConfig, chunk_tokens: int, noise: torch.Generator
) -> float:
    """Set each parameter's ``.grad`` to the DP-SGD estimate of ``batch``: clipped per-example
    gradients summed, Gaussian noise of ``noise_multiplier * clip`` added, over the batch size."""
    total, _norms, loss = clipped_gradient(model, params, batch, sgd.clip, chunk_tokens)
    std = sgd.noise_multiplier * sgd.clip
    for p, t in zip(params, total, strict=True):
        if std > 0:
            t.add_(torch.normal(0.0, std, size=t.shape, generator=noise))
        p.grad = (t / len(batch)).to(p.dtype)
    return loss


def _proximal(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's term ``mu / 2 * ||w - w_global||^2`` over the trainable tensors."""
    return 0.5 * mu * torch.stack([((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)]).sum()


def train_round(
    model: torch.nn.Module,
    data: LocalData,
    cfg: TrainConfig,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] = lambda: False,
    dp_sgd: DPSGDConfig | None = None,
    anchors: list[torch.Tensor] | None = None,
) -> RoundResult:
    """Run ``cfg.local_steps`` AdamW steps on the adapter; stops early when ``should_stop()``.

    With ``cfg.fedprox_mu > 0`` the loss gets FedProx's proximal term
    ``mu / 2 * ||w - w_global||^2`` over the trainable tensors, ``w_global`` being their
    values when the round starts (or ``anchors``, in the order of the trainable parameters:
    Ditto's personal adapter is pulled toward the global one); the reported train loss excludes it. With ``dp_sgd``
    enabled, each step is a DP-SGD step (:class:`~edge_agent.privacy.DPSGDConfig`) on a batch
    drawn without replacement; the proximal term's gradient, which holds no example, is added
    after the noise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    if anchors is not None and [a.shape for a in anchors] != [p.shape for p in params]:
        raise ValueError("anchors do not match the trainable parameters")
    anchors = (anchors if anchors is not None else [p.detach().clone() for p in params]) if cfg.fedprox_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    private = dp_sgd is not None and dp_sgd.enabled
    noise = torch.Generator().manual_seed(secrets.randbits(63)) if private else None
    for batch in data.batches(rng, cfg.batch_size, cfg.local_steps, replace=not private):
        if should_stop():
            break
        step_started = time.monotonic()
        if private:
            assert dp_sgd is not None and noise is not None
            losses.append(_private_step(model, params, batch, dp_sgd, cfg.loss_chunk_tokens, noise))
            if anchors:
                for p, g in zip(params, torch.autograd.grad(_proximal(params, anchors, cfg.fedprox_mu), params), strict=True):
                    p.grad = p.grad + g if p.grad is not None else g
        else:
            loss = lm_loss(model, batch, cfg.loss_chunk_tokens)
            objective = loss
            if anchors:
                objective = loss + _proximal(params, anchors, cfg.fedprox_mu)
            objective.backward()
            losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad(set_to_none=True)
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
        targets = int((batch[:, 1:] >= 0).sum())  # each batch weighs by the positions it predicts
        total += float(lm_loss(model, batch, chunk_tokens)) * targets
        count += targets
    return total / max(count, 1)
