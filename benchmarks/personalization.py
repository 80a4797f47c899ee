"""Personal adapters (Ditto) against the global and the local-only model, each on the device's own held-out text.

    python -m benchmarks.personalization [--devices 5] [--ticks 10] [--local-steps 3]
                                         [--variants finetune:0.1:0.001 ditto:1:0.001] [--model auto|smollm2|tiny] [--json]

Non-IID split: device ``i`` holds domain ``i`` of the pydoc corpus. For every device, three
models are scored on its own held-out blocks, tick by tick where the run has ticks:

* **global**: the fleet's model, FedAsync with the default codec both ways
  (:func:`benchmarks.fedsim.run_federated`, the daemons' code);
* **local-only**: the device trains alone from version 0 with the compute it spends in the
  federated run (``ticks x local_steps`` steps);
* **personal**: the agent's own personal adapter (:class:`edge_agent.personal.PersonalAdapter`),
  one per ``METHOD:LAMBDA`` of ``--variants``: when the device adopts the version a tick made
  (once per round of its own, as the agent does), ``local_steps`` steps on its data pulled
  toward that version, carried on from round to round (``ditto``) or started from that version
  every time (``finetune``); it is scored against that same version.

``personal_beats_both_on_every_device`` is true when the recommended variant
(:data:`RECOMMENDED`, what ``docs/agent.md`` recommends) has a lower final held-out loss
than both the global and the local-only model on every device; ``beats_both_by_variant``
gives the same for each variant.
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
from edge_agent.errors import ConfigError
from edge_agent.model import set_trainable
from edge_agent.personal import PersonalAdapter
from edge_agent.train import evaluate

RECOMMENDED = f"finetune:{TrainConfig().personal_lambda:g}:0.001"
"""What docs/agent.md recommends: ``train.personal = "finetune"``, ``personal_lr = 0.001`` (a third of the fleet's)."""


def _variant(text: str) -> TrainConfig:
    """``METHOD:LAMBDA[:LR]``: a personal adapter's settings (LR 0 or absent: the devices' rate)."""
    method, lam, *lr = text.split(":")
    return replace(TrainConfig(), personal=method, personal_lambda=float(lam), personal_lr=float(lr[0]) if lr else 0.0)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.personalization", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=10, help="federated ticks (each device trains one round per tick)")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=[RECOMMENDED, "ditto:1:0.001"], metavar="METHOD:LAMBDA[:LR]")
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks per device")
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if RECOMMENDED not in args.variants:
        args.variants.insert(0, RECOMMENDED)
    try:
        variants = {v: _variant(v) for v in args.variants}
    except (IndexError, ValueError, ConfigError) as exc:
        parser.error(f"--variants: expected METHOD:LAMBDA[:LR] such as ditto:0.1 or finetune:0.1:0.001 ({exc})")
    console = Console(stderr=True, width=140)
    t0 = time.monotonic()
    sim, datas, train = buffered_setup(args.model, args.devices, args.local_steps, console)
    blocks, batch = args.eval_blocks, train.batch_size
    n = args.devices

    def own_loss(i: int, state: dict[str, np.ndarray]) -> float:
        set_trainable(sim.model, state)
        return evaluate(sim.model, datas[i], blocks, batch)

    state_root = Path(tempfile.mkdtemp(prefix="fedge-personal-"))
    adapters = {
        v: [
            PersonalAdapter(
                state_root / v.replace(":", "-") / f"device-{i}",
                replace(train, personal=c.personal, personal_lambda=c.personal_lambda, personal_lr=c.personal_lr, eval_blocks=blocks),
            )
            for i in range(n)
        ]
        for v, c in variants.items()
    }
    rngs = {v: [np.random.default_rng([args.seed, 7, i]) for i in range(n)] for v in variants}
    by_tick: dict[str, list[list[float]]] = {"global": [], **{f"personal {v}": [] for v in variants}}

    def after_tick(tick: int, state: dict[str, np.ndarray]) -> None:
        # Each device adopts the new version and trains its personal adapter on it, as the agent
        # does once per round of its own; both are then scored on its own held-out text.
        by_tick["global"].append([own_loss(i, state) for i in range(n)])
        for v in variants:
            scores = []
            for i in range(n):
                adapters[v][i].train(sim.model, datas[i], state, rngs[v][i])
                scores.append(adapters[v][i].evaluate(sim.model, datas[i], state))
            by_tick[f"personal {v}"].append([float("nan") if x is None else x for x in scores])
        line = ", ".join(f"{k} {np.mean(v[-1]):.4f}" for k, v in by_tick.items())
        console.print(f"  tick {tick + 1}/{args.ticks}: mean own held-out loss: {line}")

    console.print(
        f"model {sim.name}, {n} devices (non-IID pydoc domains), {args.ticks} ticks x {args.local_steps} steps, "
        f"personal variants {list(variants)} (recommended {RECOMMENDED})"
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
    )
    local = [own_loss(i, train_alone(sim, datas[i], train, args.ticks, seed=args.seed * 1000 + i)) for i in range(n)]
    final = {"base": base, "global": by_tick["global"][-1], "local-only": local}
    for v in variants:
        final[f"personal {v}"] = by_tick[f"personal {v}"][-1]

    table = Table(title=f"final held-out loss on each device's own data ({sim.name}; lower is better)")
    table.add_column("model")
    for i in range(n):
        table.add_column(f"device {i + 1}", justify="right")
    table.add_column("mean", justify="right")
    for label, losses in final.items():
        table.add_row(label, *[f"{x:.4f}" for x in losses], f"[bold]{np.mean(losses):.4f}[/bold]")
    console.print(table)

    def beats_both(v: str) -> bool:
        return all(p < min(g, lo) for p, g, lo in zip(final[f"personal {v}"], final["global"], local, strict=True))

    verdicts = {v: beats_both(v) for v in variants}
    beats = verdicts[RECOMMENDED]
    verdict = "beats both the global and the local-only model" if beats else "[red]does NOT beat both[/red]"
    console.print(f"{RECOMMENDED}: the personal model {verdict} on every device")
    report: dict[str, Any] = {
        "model": sim.name,
        "devices": n,
        "ticks": args.ticks,
        "local_steps": args.local_steps,
        "recommended": RECOMMENDED,
        "final": final,
        "by_tick": by_tick,
        "beats_both_by_variant": verdicts,
        "personal_beats_both_on_every_device": beats,
        "federated_bytes_up": fed.bytes_up,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        print(json.dumps(report))
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
