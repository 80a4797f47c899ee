"""Personal adapters (Ditto) against the global and the local-only model, each on the device's own held-out text.

    python -m benchmarks.personalization [--devices 5] [--ticks 10] [--local-steps 3] [--lambdas 0.01 0.1 1]
                                         [--model auto|smollm2|tiny] [--json]

Non-IID split: device ``i`` holds domain ``i`` of the pydoc corpus. For every device, three
models are scored on its own held-out blocks, tick by tick where the run has ticks:

* **global**: the fleet's model, FedAsync with the default codec both ways
  (:func:`benchmarks.fedsim.run_federated`, the daemons' code);
* **local-only**: the device trains alone from version 0 with the compute it spends in the
  federated run (``ticks x local_steps`` steps);
* **personal**: the agent's own Ditto adapter (:class:`edge_agent.personal.PersonalAdapter`,
  ``train.personal = "ditto"``): after each of the device's rounds, ``local_steps`` steps on
  its data pulled toward the global version it trained from, with each ``lambda`` of
  ``--lambdas``. The agent's default (``train.personal_lambda``) decides the verdict.

``personal_beats_both_on_every_device`` is true when the default lambda's personal model has a
lower final held-out loss than both the global and the local-only model on every device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.federated_vs_local import train_alone
from benchmarks.fedsim import buffered_setup, run_federated
from compression import CodecConfig
from coordinator.config import DEFAULT_DOWNLINK
from coordinator.strategy import FedAsyncConfig
from edge_agent.config import TrainConfig
from edge_agent.model import set_trainable
from edge_agent.personal import PersonalAdapter
from edge_agent.train import evaluate

DEFAULT_LAMBDA = TrainConfig().personal_lambda


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.personalization", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=10, help="federated ticks (each device trains one round per tick)")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, DEFAULT_LAMBDA, 1.0])
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks per device")
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if DEFAULT_LAMBDA not in args.lambdas:
        args.lambdas.append(DEFAULT_LAMBDA)
    console = Console(stderr=True, width=140)
    t0 = time.monotonic()
    sim, datas, train = buffered_setup(args.model, args.devices, args.local_steps, console)
    blocks, batch = args.eval_blocks, train.batch_size
    n = args.devices

    def own_loss(i: int, state: dict[str, np.ndarray]) -> float:
        set_trainable(sim.model, state)
        return evaluate(sim.model, datas[i], blocks, batch)

    state_root = Path(tempfile.mkdtemp(prefix="fedge-personal-"))
    personal_cfg = replace(train, personal="ditto", eval_blocks=blocks)
    adapters = {
        lam: [PersonalAdapter(state_root / f"lambda-{lam:g}" / f"device-{i}", replace(personal_cfg, personal_lambda=lam)) for i in range(n)]
        for lam in args.lambdas
    }
    rngs = {lam: [np.random.default_rng([args.seed, 7, i]) for i in range(n)] for lam in args.lambdas}
    by_tick: dict[str, list[list[float]]] = {"global": [], **{f"personal {lam:g}": [] for lam in args.lambdas}}
    trained_on: dict[int, dict[str, np.ndarray]] = {}

    def after_device(i: int, state: dict[str, np.ndarray]) -> None:
        trained_on[i] = state
        for lam in args.lambdas:
            adapters[lam][i].train(sim.model, datas[i], state, rngs[lam][i])

    def after_tick(tick: int, state: dict[str, np.ndarray]) -> None:
        by_tick["global"].append([own_loss(i, state) for i in range(n)])
        for lam in args.lambdas:
            by_tick[f"personal {lam:g}"].append(
                [adapters[lam][i].evaluate(sim.model, datas[i], trained_on[i]) or float("nan") for i in range(n)]
            )
        line = ", ".join(f"{k} {np.mean(v[-1]):.4f}" for k, v in by_tick.items())
        console.print(f"  tick {tick + 1}/{args.ticks}: mean own held-out loss: {line}")
        return None

    console.print(
        f"model {sim.name}, {n} devices (non-IID pydoc domains), {args.ticks} ticks x {args.local_steps} steps, "
        f"Ditto lambdas {args.lambdas} (default {DEFAULT_LAMBDA:g})"
    )
    base = [own_loss(i, sim.v0) for i in range(n)]
    fed = run_federated(
        sim,
        datas,
        "federated",
        CodecConfig(),
        DEFAULT_DOWNLINK,
        ticks=args.ticks,
        train=train,
        strategy=FedAsyncConfig(),
        seed=args.seed,
        after_tick=after_tick,
        after_device=after_device,
    )
    local = [own_loss(i, train_alone(sim, datas[i], train, args.ticks, seed=args.seed * 1000 + i)) for i in range(n)]
    final = {"base": base, "global": by_tick["global"][-1], "local-only": local}
    for lam in args.lambdas:
        final[f"personal {lam:g}"] = by_tick[f"personal {lam:g}"][-1]

    table = Table(title=f"final held-out loss on each device's own data ({sim.name}; lower is better)")
    table.add_column("model")
    for i in range(n):
        table.add_column(f"device {i + 1}", justify="right")
    table.add_column("mean", justify="right")
    for label, losses in final.items():
        table.add_row(label, *[f"{x:.4f}" for x in losses], f"[bold]{np.mean(losses):.4f}[/bold]")
    console.print(table)
    verdicts = {
        f"{lam:g}": all(p < min(g, lo) for p, g, lo in zip(final[f"personal {lam:g}"], final["global"], local, strict=True))
        for lam in args.lambdas
    }
    beats = verdicts[f"{DEFAULT_LAMBDA:g}"]
    console.print(
        f"default lambda {DEFAULT_LAMBDA:g}: "
        + (
            "personal beats both the global and the local-only model on every device"
            if beats
            else "[red]personal does NOT beat both on every device[/red]"
        )
    )
    report: dict[str, Any] = {
        "model": sim.name,
        "devices": n,
        "ticks": args.ticks,
        "local_steps": args.local_steps,
        "default_lambda": DEFAULT_LAMBDA,
        "final": final,
        "by_tick": by_tick,
        "beats_both_by_lambda": verdicts,
        "personal_beats_both_on_every_device": beats,
        "federated_bytes_up": fed.bytes_up,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        print(json.dumps(report))
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
