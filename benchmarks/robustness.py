"""Robust aggregation under poisoning: held-out loss with 20% of devices poisoned, per defence.

    python -m benchmarks.robustness [--devices N] [--ticks T] [--attack flip|noise|both] [--model auto|smollm2|tiny] [--json]

Each tick every device trains on the current version and the updates form one buffer
(FedBuff, K = the devices), aggregated by ``coordinator.strategy.buffered_step`` with each
rule of ``[strategy.robust]``. Poisoned devices (the last 20%) send their honest delta
sign-flipped and scaled by 20 (``flip``), or Gaussian noise 20 times the honest delta's
standard deviation (``noise``). The first row is the honest-only fleet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.fedsim import buffered_setup, run_buffered, union_loss
from coordinator.robust import RobustConfig
from coordinator.strategy import StrategyConfig, WeightedUpdate, buffered_step

DEFENCES = ("none", "norm_bound", "trimmed_mean", "median", "multi_krum")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=6)
    parser.add_argument("--attack", choices=["flip", "noise", "both"], default="flip")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json, width=130)
    t_start = time.monotonic()
    sim, datas, train = buffered_setup(args.model, args.devices, args.local_steps, console)
    n_bad = max(1, round(0.2 * args.devices))
    bad = set(range(args.devices - n_bad, args.devices))
    honest_norms: list[float] = []

    def make_poison(kind: str) -> Any:
        def poison(i: int, delta: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray] | None:
            if kind == "honest" or i not in bad:
                honest_norms.append(float(np.sqrt(sum(float(np.square(d).sum()) for d in delta.values()))))
                return None
            if kind == "flip":
                return {n: (-20.0 * d).astype(np.float32) for n, d in delta.items()}
            return {n: rng.normal(0.0, 20.0 * float(d.std()) + 1e-8, d.shape).astype(np.float32) for n, d in delta.items()}

        return poison

    def aggregator(rule: str, clip: float) -> Any:
        cfg = StrategyConfig(
            kind="fedbuff",
            staleness="constant",
            weight_by_samples=False,
            robust=RobustConfig(rule=rule, clip=clip, trim=0.2, krum_f=n_bad),  # type: ignore[arg-type]
        )

        def agg(deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
            return buffered_step([WeightedUpdate(d, 1, 0) for d in deltas], cfg)

        return agg

    base_loss = union_loss(sim, datas, sim.v0, 8, 2)
    console.print(f"honest-only run ({sim.name}, {args.devices} devices, {args.ticks} ticks) ...")
    # The same fleet with every device honest; its first-tick update norms set the norm bound.
    honest = run_buffered(sim, datas, "honest", aggregator("none", 1.0), ticks=args.ticks, train=train, poison=make_poison("honest"))
    clip = float(np.median(honest_norms[: args.devices]))
    rows = [{"attack": "none", "defence": "none (every device honest)", "final_eval_loss": honest.final_loss, "losses": honest.losses}]
    attacks = ["flip", "noise"] if args.attack == "both" else [args.attack]
    for attack in attacks:
        for rule in DEFENCES:
            console.print(f"{attack} attack, defence {rule} ...")
            agg = aggregator(rule, clip)
            res = run_buffered(sim, datas, f"{attack}/{rule}", agg, ticks=args.ticks, train=train, poison=make_poison(attack))
            rows.append({"attack": attack, "defence": rule, "final_eval_loss": res.final_loss, "losses": res.losses})
    ref = honest.final_loss
    table = Table(
        title=f"{n_bad} of {args.devices} devices poisoned; held-out loss at version 0: {base_loss:.4f}; norm bound C = {clip:.3g}"
    )
    for col in ("attack", "defence", "final held-out loss", "vs honest only"):
        table.add_column(col, justify="left" if col in ("attack", "defence") else "right")
    for r in rows:
        table.add_row(r["attack"], r["defence"], f"{r['final_eval_loss']:.4f}", f"{(r['final_eval_loss'] - ref) / ref:+.2%}")
    console.print(table)
    report = {
        "model": sim.name,
        "devices": args.devices,
        "poisoned": n_bad,
        "ticks": args.ticks,
        "clip": clip,
        "eval_loss_v0": base_loss,
        "honest_final_eval_loss": ref,
        "runs": rows,
        "seconds": time.monotonic() - t_start,
    }
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
