"""Fed-SB / LoRA-SB, a candidate of ``benchmarks.codec``: each LoRA module trains only an r x r core
``R`` between frozen factors, ``delta W = (alpha / r) B0 R A0``, so that an update is ``r^2`` values
per module, averaged exactly, whatever the codec.

``B0`` and ``A0`` are the top-r singular vectors of the loss gradient with respect to the
frozen base weight, taken once on calibration text (LoRA-SB's initialisation). Every device
must hold the same factors, so they come from text the coordinator could hold: the other
corpus, never the devices' own data. The core starts at zero: version 0 is the base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from benchmarks.fedsim import SimModel
from edge_agent.data import LocalData
from edge_agent.train import lm_loss


class CoreB(torch.nn.Module):
    """``h -> B0 (R h[:r]) + F h[r:]``: the frozen ``B0`` after the trainable core ``R`` (in place of
    LoRA's B), plus ``F``, the cores of earlier phases folded into a frozen low-rank term (their
    inputs are the rows of the A side after the first r)."""

    def __init__(self, b0: torch.Tensor, r: int) -> None:
        super().__init__()
        self.r = r
        self.core = torch.nn.Parameter(torch.zeros(r, r))
        self.register_buffer("b0", b0)
        self.register_buffer("folded", torch.zeros(b0.shape[0], 0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(torch.nn.functional.linear(h[..., : self.r], self.core), self.b0)
        if self.folded.shape[1]:
            out = out + torch.nn.functional.linear(h[..., self.r :], self.folded)
        return out


def _lora_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import layer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, layer.Linear)]


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def calibration_factors(sim: SimModel, calib: Sequence[LocalData], r: int, blocks: int = 16) -> Factors:
    """``(B0, A0)`` per LoRA module: the top-r singular vectors of ``-dL/dW`` on calibration blocks,
    at the model's state ``sim.v0`` (with the cores of a :func:`core_adapter`: at what earlier
    phases folded in)."""
    mods = _lora_modules(sim.model)
    grads: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in mods:

        def forward_hook(mod: Any, inp: Any, out: torch.Tensor, name: str = name) -> None:
            x = inp[0].detach()

            def backward_hook(g: torch.Tensor, x: torch.Tensor = x, name: str = name) -> None:
                gw = torch.einsum("bto,bti->oi", g.float(), x.float())
                grads[name] = grads[name] + gw if name in grads else gw

            out.register_hook(backward_hook)

        hooks.append(m.register_forward_hook(forward_hook))
    sim.set_state(sim.model, sim.v0)
    sim.model.train()
    try:
        for d in calib:
            part = d.train[:blocks]
            for i in range(0, len(part), 4):
                lm_loss(sim.model, part[i : i + 4]).backward()
    finally:
        for h in hooks:
            h.remove()
        sim.model.zero_grad(set_to_none=True)
        sim.model.eval()
    factors = {}
    for name, _m in mods:
        u, _s, vh = torch.linalg.svd(-grads[name], full_matrices=False)
        factors[name] = (u[:, :r].contiguous(), vh[:r].contiguous())
    return factors


class CoreRun:
    """The cores of one run, and the refresh between phases (a Fed-SB variant that does not stay in
    one subspace): the global cores are folded into each module's frozen term, new factors come
    from the calibration gradient at the folded model, and the cores start again from zero.

    Every device does the same fold with the global cores it holds; the new factors (the same
    size as an adapter of rank r) go down once per refresh, and are counted so."""

    def __init__(self, sim: SimModel, mods: list[tuple[str, Any]], r: int) -> None:
        self.sim, self.mods, self.r = sim, mods, r
        self.refreshes = 0
        self.factor_bytes = 0

    def refresh(self, state: dict[str, np.ndarray], calib: Sequence[LocalData]) -> dict[str, np.ndarray]:
        """Fold ``state`` (the global cores) in, recalibrate, and return the new (zero) global state."""
        with torch.no_grad():
            for name, m in self.mods:
                a_side, b_side = m.lora_A["default"], m.lora_B["default"]
                core = torch.from_numpy(np.asarray(state[f"{name}.core"], dtype=np.float32))
                # B0 R A0 joins the frozen term: its A0 rows go first among the rows after the
                # first r (those rows are the new phase's, replaced below), its columns first in F.
                a0 = a_side.weight[: self.r]
                b_side.folded = torch.cat([b_side.b0 @ core, b_side.folded], dim=1)
                a_side.weight = torch.nn.Parameter(torch.cat([a0, a0, a_side.weight[self.r :]], dim=0), requires_grad=False)
                b_side.core.zero_()
        factors = calibration_factors(self.sim, calib, self.r)
        with torch.no_grad():
            for name, m in self.mods:
                b0, a0 = factors[name]
                a_side, b_side = m.lora_A["default"], m.lora_B["default"]
                a_side.weight = torch.nn.Parameter(torch.cat([a0, a_side.weight[self.r :]], dim=0), requires_grad=False)
                b_side.b0 = b0
                self.factor_bytes += 4 * (b0.numel() + a0.numel())
        self.refreshes += 1
        return {k: np.zeros_like(v) for k, v in state.items()}


@contextmanager
def core_adapter(sim: SimModel, factors: Factors, r: int) -> Iterator[CoreRun]:
    """Train cores instead of the adapters for one run; the adapters come back afterwards."""
    mods = _lora_modules(sim.model)
    saved = [(m, m.lora_A["default"], m.lora_B["default"]) for _n, m in mods]
    trainable = [p for p in sim.model.parameters() if p.requires_grad]
    v0, get_state, set_state = sim.v0, sim.get_state, sim.set_state
    cores: dict[str, torch.nn.Parameter] = {}
    for name, m in mods:
        b0, a0 = factors[name]
        a = torch.nn.Linear(a0.shape[1], r, bias=False)
        a.weight = torch.nn.Parameter(a0.clone(), requires_grad=False)
        m.lora_A["default"] = a
        m.lora_B["default"] = CoreB(b0, r)
        cores[f"{name}.core"] = m.lora_B["default"].core
    for p in trainable:
        p.requires_grad_(False)

    def read(_model: torch.nn.Module) -> dict[str, np.ndarray]:
        return {k: c.detach().numpy().copy() for k, c in cores.items()}

    def write(_model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, c in cores.items():
                c.copy_(torch.from_numpy(np.asarray(state[k], dtype=np.float32)))

    sim.v0 = {k: np.zeros((r, r), np.float32) for k in cores}
    sim.get_state, sim.set_state = read, write
    try:
        yield CoreRun(sim, mods, r)
    finally:
        for m, a, b in saved:
            m.lora_A["default"], m.lora_B["default"] = a, b
        for p in trainable:
            p.requires_grad_(True)
        sim.v0, sim.get_state, sim.set_state = v0, get_state, set_state
