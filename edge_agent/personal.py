"""A personal adapter beside the global one.

The device trains the global adapter ``w`` as always and sends its update. It also keeps its
own adapter ``v`` of the same shape: on the first version ``w`` it adopts after each of its
rounds, ``v`` takes ``steps`` AdamW steps on the device's data against
``f_i(v) + lambda / 2 * ||v - w||^2``. Two ways to carry ``v``:

- ``ditto`` (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization",
  ICML 2021): ``v`` goes on from round to round; ``lambda`` sets how far it may drift from the
  fleet (0 is local-only training, a large one is the global model);
- ``finetune``: ``v`` starts from ``w`` every round, so it is the fleet's newest model adapted
  to the device's data.

``v`` never leaves the device: it is not in any update, and it lives in
``<state_dir>/personal.safetensors`` (written atomically).

A damaged file, or one of other tensors than the fleet's (the fleet's spec changed), is moved
aside (``personal.safetensors.bad``), never deleted, and ``v`` starts again from ``w``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from edge_agent.config import TrainConfig
from edge_agent.data import LocalData
from edge_agent.model import get_trainable, set_trainable
from edge_agent.state import atomic_write
from edge_agent.train import RoundResult, evaluate, train_round

log = logging.getLogger(__name__)

PERSONAL = "personal.safetensors"
MAX_PERSONAL_BYTES = 1 << 30


class PersonalAdapter:
    """The device's own adapter ``v``, trained with Ditto's proximal term toward the global ``w``."""

    def __init__(self, state_dir: str | Path, cfg: TrainConfig) -> None:
        self.path = Path(state_dir) / PERSONAL
        self.cfg = cfg
        self.tensors: dict[str, np.ndarray] | None = self._load()

    def _load(self) -> dict[str, np.ndarray] | None:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        if not self.path.is_file():
            return None
        try:
            if self.path.stat().st_size > MAX_PERSONAL_BYTES:
                raise ValueError(f"larger than {MAX_PERSONAL_BYTES >> 20} MiB")
            tensors = load(self.path.read_bytes())
            if not tensors or any(v.dtype != np.float32 or not np.isfinite(v).all() for v in tensors.values()):
                raise ValueError("not finite float32 tensors")
        except (OSError, ValueError, SafetensorError) as exc:
            self._set_aside(f"unreadable ({exc})")
            return None
        return tensors

    def _set_aside(self, why: str) -> None:
        if not self.path.exists():
            return
        bad = self.path.with_name(self.path.name + ".bad")
        log.warning("personal adapter %s %s: moved to %s; it starts again from the global adapter", self.path, why, bad.name)
        os.replace(self.path, bad)

    def start(self, global_tensors: dict[str, np.ndarray], training: bool = False) -> dict[str, np.ndarray]:
        """``v`` for a round on ``global_tensors``: the stored one, or ``w`` itself the first time
        (or when the stored one has other tensors than the fleet's); ``finetune`` trains from
        ``w`` every round."""
        if training and self.cfg.personal == "finetune":
            return {k: v.copy() for k, v in global_tensors.items()}
        if self.tensors is not None:
            shapes = {k: v.shape for k, v in global_tensors.items()}
            if {k: v.shape for k, v in self.tensors.items()} == shapes:
                return self.tensors
            self._set_aside("has other tensors than the fleet's")
            self.tensors = None
        return {k: v.copy() for k, v in global_tensors.items()}

    def train(
        self,
        model: torch.nn.Module,
        data: LocalData,
        global_tensors: dict[str, np.ndarray],
        rng: np.random.Generator,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> RoundResult:
        """Train ``v`` for ``personal_steps`` steps toward the data and ``w = global_tensors``, save
        it, and leave ``model`` holding ``w`` again."""
        set_trainable(model, global_tensors)
        anchors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        set_trainable(model, self.start(global_tensors, training=True))
        c = self.cfg
        cfg = replace(c, local_steps=c.personal_steps or c.local_steps, lr=c.personal_lr or c.lr, fedprox_mu=c.personal_lambda)
        try:
            result = train_round(model, data, cfg, rng, should_stop=should_stop, anchors=anchors)
            if result.steps:
                self.tensors = get_trainable(model)
                self.save()
        finally:
            set_trainable(model, global_tensors)
        return result

    def save(self) -> None:
        from safetensors.numpy import save

        assert self.tensors is not None
        atomic_write(self.path, save({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}))

    def evaluate(self, model: torch.nn.Module, data: LocalData, global_tensors: dict[str, np.ndarray]) -> float | None:
        """``v``'s held-out loss (None before its first round); ``model`` holds ``w`` again after."""
        if self.tensors is None:
            return None
        set_trainable(model, self.start(global_tensors))
        try:
            return evaluate(model, data, self.cfg.eval_blocks, self.cfg.batch_size, self.cfg.loss_chunk_tokens)
        finally:
            set_trainable(model, global_tensors)
