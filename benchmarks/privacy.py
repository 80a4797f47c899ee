"""Central DP: held-out loss against ε, for a few noise multipliers, on the non-IID run.

    python -m benchmarks.privacy [--devices N] [--ticks T] [--z 0.5 1 2] [--clip C] [--model auto|smollm2|tiny] [--json]

DP-FedBuff exactly as the coordinator runs it (``coordinator.privacy.dp_mean``): each tick
every device trains on the current version, their updates form one buffer (K = the
devices), each is clipped to C, the mean over K gets Gaussian noise z·C/K. ε is each
device's (they all take part in every buffer), at δ = 1e-5, from dp-accounting's PLD
accountant, without sampling amplification. The first row is the same run without DP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.fedsim import buffered_setup, run_buffered, union_loss
from coordinator.privacy import DPConfig, dp_mean, epsilon

DELTA = 1e-5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--ticks", type=int, default=8)
    parser.add_argument("--z", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="noise multipliers")
    parser.add_argument("--clip", type=float, default=0.0, help="C (0 = the median update norm of the first tick)")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json, width=130)
    t_start = time.monotonic()
    sim, datas, train = buffered_setup(args.model, args.devices, args.local_steps, console)
    k = args.devices
    norms: list[float] = []

    def plain(deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        norms.extend(float(np.sqrt(sum(float(np.square(d).sum()) for d in u.values()))) for u in deltas)
        return {n: np.mean([u[n] for u in deltas], axis=0).astype(np.float32) for n in deltas[0]}

    base_loss = union_loss(sim, datas, sim.v0, 8, 2)
    console.print(f"run without DP ({sim.name}, {args.devices} devices, {args.ticks} ticks) ...")
    runs = [("no DP", None, run_buffered(sim, datas, "no DP", plain, ticks=args.ticks, train=train))]
    clip = args.clip or float(np.median(norms[:k]))
    shapes = {n: v.shape for n, v in sim.v0.items()}
    for z in args.z:
        cfg = DPConfig(enabled=True, clip=clip, noise_multiplier=z, delta=DELTA)
        rng = np.random.default_rng(0)

        def noised(deltas: list[dict[str, np.ndarray]], cfg: DPConfig = cfg, rng: np.random.Generator = rng) -> dict[str, np.ndarray]:
            return dp_mean(deltas, shapes, [1.0] * len(deltas), cfg, k, rng)

        console.print(f"DP run, z = {z} ...")
        runs.append((f"z = {z:g}", z, run_buffered(sim, datas, f"z={z}", noised, ticks=args.ticks, train=train)))

    table = Table(title=f"central DP (DP-FedBuff, K={k}, C={clip:.3g}, δ={DELTA:g}); held-out loss at version 0: {base_loss:.4f}")
    for col in ("run", "noise multiplier z", "ε per device", "final held-out loss", "vs no DP"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = []
    ref = runs[0][2].final_loss
    for label, z, res in runs:
        eps = epsilon(args.ticks, z, DELTA) if z is not None else float("inf")
        rows.append({"run": label, "z": z, "epsilon": eps, "final_eval_loss": res.final_loss, "losses": res.losses})
        table.add_row(
            label,
            "-" if z is None else f"{z:g}",
            "∞" if z is None else f"{eps:.3g}",
            f"{res.final_loss:.4f}",
            f"{(res.final_loss - ref) / ref:+.2%}",
        )
    console.print(table)
    report = {
        "model": sim.name,
        "devices": args.devices,
        "ticks": args.ticks,
        "clip": clip,
        "delta": DELTA,
        "eval_loss_v0": base_loss,
        "curve": [{"z": r["z"], "epsilon": r["epsilon"], "final_eval_loss": r["final_eval_loss"]} for r in rows if r["z"] is not None],
        "no_dp_final_eval_loss": ref,
        "runs": [{**r, "epsilon": None if r["z"] is None else r["epsilon"]} for r in rows],
        "seconds": time.monotonic() - t_start,
    }
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
