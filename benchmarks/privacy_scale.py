"""Differential privacy at fleet scale: held-out loss and ε with amplification by cohort sampling.

    python -m benchmarks.privacy_scale [--devices 1000] [--cohort 100] [--rounds 50] [--eps 2 4 8] [--json]

**The fleet.** ``--devices`` virtual devices of the simulation API (:mod:`fedge_lab.virtual`),
each holding its own shard of the pydoc corpus (non-IID: device ``i`` holds blocks of topic
domain ``i mod 5`` only), all training the same tiny model (LoRA, built from the corpus, no
download) for real on their text.

**The rounds.** Each round samples a cohort of ``--cohort`` devices uniformly without
replacement, seeded (``numpy.random.default_rng([seed, round])``, as the coordinator's
:class:`~coordinator.cohorts.CohortPlanner` does); each member trains on the current version
and uploads; the engine's DP-FedBuff (the coordinator's code) clips each update to ``C``,
averages over the fixed K, adds Gaussian noise ``z·C/K`` to every coordinate, and makes the next
version. The non-private baseline is the same run, same seeds, without clipping or noise.

**The privacy.** Each run's noise multiplier is the smallest whose ε over all its rounds,
with amplification by the cohort sampling (:func:`coordinator.privacy.amplified_epsilon`:
dp-accounting's RDP accountant for sampling without replacement, substitution of one device),
is the target ε at δ = ``--delta`` (at most 1/N). Each run reports that ε, and the Poisson
cross-check (PLD). Device-level DP: a device's whole update is what is protected.

Reported: the held-out loss every ``--eval-every`` rounds for each run (mean over
``--eval-devices`` devices' held-out blocks, the same devices every time), and the share
of the non-private run's loss reduction (base loss minus final loss) each private run keeps
(``kept_reduction_eps8`` in the JSON). With ``--plot`` the curves go to a PNG.
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

from coordinator.privacy import DPConfig, amplified_epsilon, calibrate_noise
from coordinator.strategy import StrategyConfig

DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "privacy_scale.png"


def run(
    args: argparse.Namespace, z: float | None, io: Any, datas: list[Any], v0: dict[str, np.ndarray], train: Any, console: Console
) -> list[float]:
    """One run's held-out losses (round 0, then every ``eval_every`` rounds); ``z=None``: no DP."""
    from edge_agent.train import evaluate
    from fedge_lab.virtual import SimCoordinator, VirtualDevice

    strategy = StrategyConfig(kind="fedbuff", buffer_size=args.cohort, server_lr=args.server_lr, staleness="constant")
    dp = None if z is None else DPConfig(enabled=True, clip=args.clip, noise_multiplier=z, delta=args.delta, seed=args.seed)
    coord = SimCoordinator(strategy, v0, None, dp=dp)
    fleet = [VirtualDevice(f"d{i:04d}", d, np.random.default_rng([args.seed, i])) for i, d in enumerate(datas)]
    evals = datas[: args.eval_devices]

    def loss() -> float:
        io.load(coord.state)
        return float(np.mean([evaluate(io.model, d, args.eval_blocks, 2) for d in evals]))

    losses = [loss()]
    for r in range(1, args.rounds + 1):
        members = np.random.default_rng([args.seed, r]).choice(len(fleet), size=args.cohort, replace=False)
        base, state = coord.version, coord.state
        for i in sorted(members):
            coord.submit(fleet[int(i)].train(io, state, base, train, None), 0.0)
        if coord.version != base + 1:
            raise RuntimeError(f"round {r}: the cohort of {args.cohort} did not make one version")
        if r % args.eval_every == 0 or r == args.rounds:
            losses.append(loss())
            console.print(f"  round {r:>3}: held-out loss {losses[-1]:.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=100, help="devices sampled per round (K)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--eps", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-4, help="at most 1/devices")
    parser.add_argument("--clip", type=float, default=0.5, help="C: the L2 bound of one update")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-devices", type=int, default=30)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, nargs="?", const=DEFAULT_PLOT, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.delta <= 1.0 / args.devices:
        parser.error(f"--delta must be in (0, 1/devices] = (0, {1.0 / args.devices:g}]")
    if not 0 < args.cohort <= args.devices:
        parser.error("--cohort must be in 1..devices")
    console = Console(stderr=args.json, width=130)
    t0 = time.monotonic()

    from fedge_lab.simulation import SimulationConfig, build_model, shard_corpus
    from fedge_lab.virtual import ModelIO

    cfg = SimulationConfig()
    train = replace(cfg.train, lr=args.lr, local_steps=args.local_steps)
    model, tokenizer, v0 = build_model(cfg, Path(tempfile.mkdtemp(prefix="fedge-privacy-scale-")))
    datas = shard_corpus("pydoc", tokenizer, args.devices, train.seq_len, seed=args.seed)
    io = ModelIO(model)
    cohorts = [(args.devices, args.cohort)] * args.rounds

    console.print(f"non-private baseline: {args.devices} devices, cohorts of {args.cohort}, {args.rounds} rounds ...")
    runs: list[dict[str, Any]] = [
        {"name": "non-private", "target_epsilon": None, "z": 0.0, "losses": run(args, None, io, datas, v0, train, console)}
    ]
    for eps in args.eps:
        z = calibrate_noise(cohorts, eps, args.delta)
        console.print(f"epsilon {eps:g}: noise multiplier {z:.3f} ...")
        row = {
            "name": f"ε = {eps:g}",
            "target_epsilon": eps,
            "z": z,
            "epsilon": amplified_epsilon(cohorts, z, args.delta),
            "epsilon_poisson_pld": amplified_epsilon(cohorts, z, args.delta, "pld_poisson"),
            "losses": run(args, z, io, datas, v0, train, console),
        }
        runs.append(row)
    base = runs[0]["losses"][0]
    reduction = base - runs[0]["losses"][-1]
    for r in runs:
        r["final_loss"] = r["losses"][-1]
        r["kept_reduction"] = (base - r["losses"][-1]) / reduction if reduction > 0 else float("nan")

    q = args.cohort / args.devices
    title = f"DP at fleet scale: {args.devices} devices, cohorts of {args.cohort} (q = {q:.2f}), {args.rounds} rounds, δ = {args.delta:g}"
    table = Table(title=title)
    for col in ("run", "z", "ε (claim, RDP)", "ε (Poisson, PLD)", "final loss", "kept of the reduction"):
        table.add_column(col, justify="right")
    for r in runs:
        eps = r.get("epsilon")
        table.add_row(
            r["name"],
            f"{r['z']:.3f}",
            "∞ (no DP)" if eps is None else f"{eps:.2f}",
            "" if eps is None else f"{r['epsilon_poisson_pld']:.2f}",
            f"{r['final_loss']:.4f}",
            f"{r['kept_reduction']:.0%}",
        )
    console.print(table)
    rounds_at = [0] + [k for k in range(1, args.rounds + 1) if k % args.eval_every == 0 or k == args.rounds]
    console.print("held-out loss by round: " + "  ".join(f"r{k}" for k in rounds_at))
    for r in runs:
        console.print(f"  {r['name']:<12} " + " ".join(f"{x:.4f}" for x in r["losses"]))
    out: dict[str, Any] = {
        "devices": args.devices,
        "cohort": args.cohort,
        "rounds": args.rounds,
        "delta": args.delta,
        "clip": args.clip,
        "eval_rounds": rounds_at,
        "base_loss": base,
        "runs": runs,
        "seconds": time.monotonic() - t0,
    }
    eps8 = next((r for r in runs if r["target_epsilon"] == 8.0), None)
    if eps8 is not None:
        out["kept_reduction_eps8"] = eps8["kept_reduction"]
    if args.plot:
        _plot(args.plot, runs, rounds_at, out)
        console.print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(out))
    return 0


def _plot(path: Path, runs: list[dict[str, Any]], rounds_at: list[int], out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        label = r["name"] if r["target_epsilon"] is None else f"{r['name']} (z = {r['z']:.2f})"
        ax.plot(rounds_at, r["losses"], marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{out['devices']} devices, cohorts of {out['cohort']}, δ = {out['delta']:g}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
