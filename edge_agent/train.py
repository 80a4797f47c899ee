"""Local training and held-out evaluation of the adapter on token blocks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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


def _loss(model: torch.nn.Module, batch: np.ndarray) -> torch.Tensor:
    ids = torch.from_numpy(batch)
    out = model(input_ids=ids, labels=ids)
    return out.loss


def train_round(
    model: torch.nn.Module,
    data: LocalData,
    cfg: TrainConfig,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] = lambda: False,
) -> RoundResult:
    """Run ``cfg.local_steps`` AdamW steps on the adapter; stops early when ``should_stop()``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    for batch in data.batches(rng, cfg.batch_size, cfg.local_steps):
        if should_stop():
            break
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return RoundResult(
        steps=len(losses),
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        samples=len(losses) * cfg.batch_size,
        seconds=time.monotonic() - t0,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: LocalData, max_blocks: int, batch_size: int) -> float:
    """Mean next-token loss over the first ``max_blocks`` held-out blocks."""
    model.eval()
    blocks = data.heldout[:max_blocks]
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        total += float(_loss(model, batch)) * len(batch)
        count += len(batch)
    return total / max(count, 1)
