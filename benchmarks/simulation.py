"""The in-process simulation at fleet scale: virtual devices, real training, the real engine, no broker.

    python -m benchmarks.simulation [--devices 1000] [--versions 100] [--strategy fedbuff] [--json]

Every virtual device holds its own shard of a non-IID corpus, its RNG and its codec
residual; one model (the tiny one unless ``--model``) is shared. Reports the wall-clock
seconds, the peak RSS and the held-out loss of every version.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.strategy import BUILTIN_KINDS, StrategyConfig
from fedge_lab.corpus import CORPORA
from fedge_lab.simulation import SimulationConfig, simulate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.simulation", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--versions", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=50, help="devices training at once")
    p.add_argument("--strategy", default="fedbuff", choices=[k for k in BUILTIN_KINDS if k != "fedavg"] + ["fedavg"])
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--model", default="tiny", help="tiny, smollm2, or a model directory")
    p.add_argument("--corpus", default="pydoc", choices=CORPORA)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    console = Console(stderr=args.json)
    base = SimulationConfig()
    strategy = StrategyConfig(
        kind=args.strategy,
        buffer_size=args.buffer_size,
        min_participants=min(args.buffer_size, args.concurrency),
        round_participants=min(args.buffer_size, args.concurrency),
    )
    cfg = replace(
        base,
        devices=args.devices,
        versions=args.versions,
        concurrency=args.concurrency,
        strategy=strategy,
        model=args.model,
        corpus=args.corpus,
        train=replace(base.train, lr=args.lr),
        seed=args.seed,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"{args.devices} devices, {args.strategy}", total=args.versions)
        result = simulate(cfg, progress=lambda versions, updates: bar.update(task, completed=versions))
    table = Table(title=f"simulation: {args.devices} devices, {args.strategy}, {args.model} model, {args.corpus} corpus")
    for col in ("version", "virtual s", "updates", "mean τ", "held-out loss", "downlink B"):
        table.add_column(col, justify="right")
    shown = result.versions if len(result.versions) <= 20 else result.versions[:: max(1, len(result.versions) // 20)]
    for v in shown:
        table.add_row(
            str(v.version),
            f"{v.time_s:.0f}",
            str(v.updates),
            f"{v.mean_staleness:.1f}",
            "-" if v.loss is None else f"{v.loss:.4f}",
            str(v.bytes_down),
        )
    console.print(table)
    out = result.to_dict()
    console.print(
        f"{out['devices']} devices, {out['versions']} versions from {out['updates']} uploads by {out['participants']} devices "
        f"in {out['seconds']:.1f} s; peak RSS {out['peak_rss_mb']:.0f} MB; held-out loss {out['initial_loss']:.4f} -> "
        f"{out['final_loss']:.4f}; rejected {out['rejected'] or 0}"
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
