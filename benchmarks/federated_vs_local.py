"""Federated vs local-only vs centralized training, scored on the union of every device's held-out text.

    python -m benchmarks.federated_vs_local [--devices 5] [--ticks 6] [--local-steps 3] [--model auto|smollm2|tiny] [--json]

Non-IID split: device ``i`` holds domain ``i`` of the pydoc corpus. Four kinds of model:

* **base**: version 0 (the pretrained model, LoRA B = 0);
* **local-only**: each device trains alone from version 0, with the compute it spends in
  the federated run (``ticks x local_steps`` steps);
* **federated**: asynchronous (FedAsync) with the default codec both ways, the same code as
  the daemons (:func:`benchmarks.fedsim.run_federated`);
* **centralized**: one model trained on the pooled data with the whole fleet's compute.

Every model is scored on every device's held-out blocks (the union); the federated model
must beat every local-only one there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.fedsim import buffered_setup, run_federated
from compression import CodecConfig
from coordinator.strategy import FedAsyncConfig
from edge_agent.data import LocalData
from edge_agent.model import get_trainable, set_trainable
from edge_agent.train import evaluate, train_round


def train_alone(sim: Any, data: LocalData, train: Any, rounds: int, seed: int) -> dict[str, np.ndarray]:
    """``rounds`` local rounds from version 0 on one dataset, as a device that never federates."""
    set_trainable(sim.model, sim.v0)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        train_round(sim.model, data, train, rng)
    return get_trainable(sim.model)


def per_domain(sim: Any, datas: list[LocalData], state: dict[str, np.ndarray], blocks: int, batch: int) -> list[float]:
    set_trainable(sim.model, state)
    return [evaluate(sim.model, d, blocks, batch) for d in datas]


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    colors = {"base": "grey", "local-only": "tab:orange", "federated": "tab:blue", "federated-fp32": "tab:cyan", "centralized": "tab:green"}
    ax.bar(range(len(rows)), [r["union_loss"] for r in rows], color=[colors[r["kind"]] for r in rows])
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right")
    lo = min(r["union_loss"] for r in rows)
    hi = max(r["union_loss"] for r in rows)
    ax.set_ylim(lo - 0.15 * (hi - lo) - 0.01, hi + 0.05 * (hi - lo) + 0.01)
    ax.set_ylabel("held-out loss on all devices' data")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.federated_vs_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=10, help="federated ticks (each device trains one round per tick)")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks per device")
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uncompressed", action="store_true", help="also run federated with uncompressed fp32 links (a reference)")
    parser.add_argument("--plot", default=str(Path(__file__).parent.parent / "docs" / "img" / "federated_vs_local.png"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=130)
    t0 = time.monotonic()
    sim, datas, train = buffered_setup(args.model, args.devices, args.local_steps, console)
    blocks, batch = args.eval_blocks, train.batch_size
    domains = [f"device {i + 1}" for i in range(args.devices)]
    rows: list[dict[str, Any]] = []

    def add(kind: str, label: str, state: dict[str, np.ndarray], seconds: float) -> None:
        losses = per_domain(sim, datas, state, blocks, batch)
        rows.append(
            {"kind": kind, "label": label, "union_loss": float(np.mean(losses)), "per_device": losses, "seconds": round(seconds, 1)}
        )
        console.print(f"  {label}: union held-out loss {np.mean(losses):.4f}")

    console.print(f"model {sim.name}, {args.devices} devices (non-IID pydoc domains), {args.ticks} ticks x {args.local_steps} steps")
    add("base", "base", sim.v0, 0.0)
    t = time.monotonic()
    # The product's links: the default uplink codec and the coordinator's default downlink.
    downlink = CodecConfig(topk_fraction=0.02, values="int8")
    fed = run_federated(
        sim, datas, "federated", CodecConfig(), downlink, ticks=args.ticks, train=train, strategy=FedAsyncConfig(), seed=args.seed
    )
    add("federated", "federated (async)", fed.state, time.monotonic() - t)
    if args.uncompressed:
        t = time.monotonic()
        raw = run_federated(
            sim, datas, "federated-fp32", None, None, ticks=args.ticks, train=train, strategy=FedAsyncConfig(), seed=args.seed
        )
        add("federated-fp32", "federated, fp32 links", raw.state, time.monotonic() - t)
    for i, data in enumerate(datas):
        t = time.monotonic()
        state = train_alone(sim, data, train, args.ticks, seed=args.seed * 1000 + i)
        add("local-only", f"local-only {domains[i]}", state, time.monotonic() - t)
    t = time.monotonic()
    pooled = LocalData(train=np.concatenate([d.train for d in datas]), heldout=np.concatenate([d.heldout for d in datas]), num_files=0)
    central = train_alone(sim, pooled, train, args.ticks * args.devices, seed=args.seed * 1000 + 999)
    add("centralized", "centralized (pooled)", central, time.monotonic() - t)

    fed_row = next(r for r in rows if r["kind"] == "federated")
    local_rows = [r for r in rows if r["kind"] == "local-only"]
    best_local = min(local_rows, key=lambda r: r["union_loss"])
    beats_all = all(fed_row["union_loss"] < r["union_loss"] for r in local_rows)
    table = Table(title=f"held-out loss per device's data ({sim.name}; lower is better)")
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("union", justify="right")
    for r in rows:
        table.add_row(r["label"], *[f"{x:.4f}" for x in r["per_device"]], f"[bold]{r['union_loss']:.4f}[/bold]")
    console.print(table)
    console.print(
        f"federated {fed_row['union_loss']:.4f} vs best local-only {best_local['union_loss']:.4f} ({best_local['label']}): "
        + ("federated beats every local-only model" if beats_all else "[red]federated does NOT beat every local-only model[/red]")
    )
    png = plot(rows, Path(args.plot), f"{sim.name}, {args.devices} non-IID devices, {args.ticks} x {args.local_steps} steps each")
    console.print(f"plot: {png}")
    report = {
        "model": sim.name,
        "devices": args.devices,
        "ticks": args.ticks,
        "local_steps": args.local_steps,
        "base_loss": rows[0]["union_loss"],
        "federated_loss": fed_row["union_loss"],
        "best_local_loss": best_local["union_loss"],
        "worst_local_loss": max(r["union_loss"] for r in local_rows),
        "centralized_loss": next(r for r in rows if r["kind"] == "centralized")["union_loss"],
        "federated_beats_every_local": beats_all,
        "federated_bytes_up": fed.bytes_up,
        "federated_dense_bytes_up": fed.dense_bytes_up,
        "models": rows,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        print(json.dumps(report))
    return 0 if beats_all else 1


if __name__ == "__main__":
    sys.exit(main())
