"""Asynchronous vs synchronous aggregation on one simulated fleet: wall-clock and bytes to a target loss.

    python -m benchmarks.async_vs_sync [--devices 1000] [--step-s 3] [--target 0.35] [--max-seconds 300]
                                       [--concurrency 400] [--background-load N] [--json]

Each strategy (FedAsync, FedBuff, synchronous FedAvg) runs on a fresh testbed: a private
Mosquitto, the coordinator process, and the same simulated fleet (same devices, speed
tiers 1x/3x/10x, data domains and seeds; :mod:`fedge_lab.simfleet`). Devices send
real default-codec frames over real MQTT; only training is the cheap objective of
:mod:`fedge_lab.objective`, whose held-out loss (1.0 at version 0) is computed
exactly for every version the coordinator publishes. The clock starts when the devices
start training and stops at the first version at or below ``--target``; the bytes are
every update the devices sent until then (including ones still buffered or rejected).

The asynchronous strategies run in cohorts (``[cohorts]``): the coordinator invites at most
``--concurrency`` devices to train at once (FedBuff's C), which bounds staleness. FedAvg
rounds take every device, as before. ``--concurrency 0`` runs them unbounded, every
device training all the time. ``--background-load N`` runs everything a second time
beside N busy processes (one spinning Python loop each, stopped by their PIDs), and
reports both conditions side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compression import CodecConfig
from coordinator.cohorts import CohortConfig
from coordinator.strategy import StrategyConfig
from fedge_lab.lab import Testbed
from fedge_lab.scoring import VersionScorer
from fedge_lab.testbed_config import AgentGroup, SimSettings, TestbedConfig

STRATEGIES = ("fedasync", "fedbuff", "fedavg")


def fleet_groups(devices: int, mix: tuple[float, float, float]) -> tuple[AgentGroup, ...]:
    """Speed tiers 1x, 3x and 10x in proportions ``mix``."""
    counts = [int(devices * m) for m in mix]
    counts[0] += devices - sum(counts)
    return tuple(AgentGroup(count=c, kind="sim", speed=s) for c, s in zip(counts, (1.0, 3.0, 10.0), strict=True) if c)


def strategy_config(kind: str, args: argparse.Namespace) -> StrategyConfig:
    if kind == "fedbuff":
        return StrategyConfig(kind="fedbuff", buffer_size=args.buffer_size, server_lr=args.server_lr, max_staleness=args.max_staleness)
    if kind == "fedasync":
        return StrategyConfig(kind="fedasync", alpha=args.alpha, max_staleness=args.max_staleness)
    # Synchronous FedAvg: every device of the fleet takes part in every round.
    return StrategyConfig(kind="fedavg", round_participants=args.devices, round_deadline_s=args.max_seconds, min_participants=2)


def cohort_config(kind: str, args: argparse.Namespace) -> CohortConfig:
    if kind == "fedavg" or args.concurrency <= 0:
        return CohortConfig()
    c = min(args.concurrency, args.devices)
    return CohortConfig(enabled=True, concurrency=c, size=min(args.cohort_size, c), deadline_s=args.max_seconds, seed=args.seed)


@contextmanager
def background_load(n: int) -> Iterator[list[int]]:
    """``n`` busy processes (a spinning loop each) for the duration, stopped by their own PIDs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


def run_one(kind: str, args: argparse.Namespace, run_dir: Path, console: Console) -> dict[str, Any]:
    cfg = TestbedConfig(
        duration_s=args.max_seconds,
        fleet="bench",
        seed=args.seed,
        model="sim",
        strategy=strategy_config(kind, args),
        cohorts=cohort_config(kind, args),
        agents=fleet_groups(args.devices, tuple(args.mix)),  # type: ignore[arg-type]
        sim=SimSettings(step_s=args.step_s, processes=args.processes, sync_wait_s=args.max_seconds, heartbeat_s=30.0),
        start_delay_s=args.start_delay,
        # Dense int8 global deltas: a top-k downlink would hold back what a synchronous round
        # aggregates from a thousand devices, and this benchmark compares aggregation, not codecs.
        downlink=CodecConfig(topk_fraction=args.downlink_topk, values="int8"),
    )
    bed = Testbed(cfg, run_dir, console)

    def reached(scorer: VersionScorer) -> bool:
        last = scorer.latest
        # Stop at the target, or once the run has clearly diverged (loss 3x that of version 0).
        return last is not None and last[2] is not None and (last[2] <= args.target or last[2] > 3.0)

    try:
        bed.start()
        why = bed.run(stop_when=reached)
    finally:
        codes = bed.stop()
    report = bed.report(codes)
    start = bed.sim_start_at if bed.sim_start_at is not None else bed.t0
    history = bed.scorer.history if bed.scorer else []
    hit = next(((t, v, loss) for t, v, loss in history if loss is not None and loss <= args.target), None)
    diverged = hit is None and any(loss is not None and loss > 3.0 for _, _, loss in history)
    t_end = hit[0] if hit else start + args.max_seconds
    sent = [r for r in bed.sent() if r["t"] <= t_end]
    losses = [(round(t - start, 3), v, loss) for t, v, loss in (bed.scorer.history if bed.scorer else []) if loss is not None]
    return {
        "strategy": kind,
        "config": asdict(cfg.strategy),
        "cohorts": asdict(cfg.cohorts),
        "reached": hit is not None,
        "diverged": diverged,
        "stopped_by": "diverged" if diverged else why,
        "time_to_target_s": round(hit[0] - start, 2) if hit else None,
        "versions_to_target": hit[1] if hit else None,
        "updates_to_target": len(sent),
        "bytes_to_target": sum(r["bytes"] for r in sent),
        "dense_bytes_to_target": sum(r["dense"] for r in sent),
        "final_loss": losses[-1][2] if losses else None,
        "versions": report["final_version"],
        "applied": report["counts"].get("accepted", 0),
        "rejections": report["rejections"],
        "loss_curve": losses,
        "optimum_loss": report["optimum_loss"],
        "run_dir": str(run_dir),
    }


def plot(results: dict[str, dict[str, Any]], target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for kind, r in results.items():
        curve = r["loss_curve"]
        label = kind + (f" ({r['time_to_target_s']:.0f} s)" if r["reached"] else " (diverged)" if r["diverged"] else " (did not reach)")
        ax.plot([t for t, _, _ in curve], [x for _, _, x in curve], label=label, drawstyle="steps-post")
    ax.axhline(target, ls="--", c="black", lw=0.8, label=f"target {target:g}")
    opt = next(iter(results.values()))["optimum_loss"]
    if opt is not None:
        ax.axhline(opt, ls=":", c="grey", lw=0.8, label="optimum")
    ax.set_xlabel("wall-clock seconds since devices started")
    ax.set_ylabel("held-out loss (1.0 = version 0)")
    ax.set_ylim(0, 1.3)
    ax.legend()
    ax.set_title("same 1,000-device fleet, speed tiers 1x / 3x / 10x" if sum(1 for _ in results) else "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async_vs_sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--mix", type=float, nargs=3, default=[0.5, 0.3, 0.2], metavar=("FAST", "MID", "SLOW"), help="shares at 1x, 3x, 10x"
    )
    parser.add_argument("--step-s", type=float, default=3.0, help="seconds of one simulated round at 1x")
    parser.add_argument("--target", type=float, default=0.35, help="held-out loss to reach (1.0 = version 0)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound on each strategy's run")
    parser.add_argument("--buffer-size", type=int, default=100, help="FedBuff K")
    parser.add_argument("--server-lr", type=float, default=1.0, help="FedBuff server learning rate")
    parser.add_argument("--alpha", type=float, default=0.6, help="FedAsync mixing rate")
    parser.add_argument("--max-staleness", type=int, default=64)
    parser.add_argument("--downlink-topk", type=float, default=1.0, help="top-k fraction of the int8 global deltas (1 = dense)")
    parser.add_argument("--processes", type=int, default=2, help="simulated-fleet processes")
    parser.add_argument("--start-delay", type=float, default=10.0, help="seconds for the fleet to connect before training")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--concurrency", type=int, default=400, help="cohorts: devices training at once (C) for fedbuff/fedasync; 0 = all")
    parser.add_argument("--cohort-size", type=int, default=20, help="devices invited together when slots free up")
    parser.add_argument("--background-load", type=int, default=0, metavar="N", help="also run beside N busy processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--plot", default=str(Path(__file__).parent.parent / "docs" / "img" / "async_vs_sync.png"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=130)
    root = Path(args.run_dir or tempfile.mkdtemp(prefix="fedge-async-vs-sync-"))
    t0 = time.monotonic()
    conditions = {"quiet": 0} | ({f"loaded ({args.background_load} busy processes)": args.background_load} if args.background_load else {})
    out: dict[str, Any] = {
        "target_loss": args.target,
        "devices": args.devices,
        "mix": args.mix,
        "step_s": args.step_s,
        "concurrency": args.concurrency,
        "background_load": args.background_load,
    }
    ok = True
    for i, (label, load) in enumerate(conditions.items()):
        results: dict[str, dict[str, Any]] = {}
        with background_load(load):
            for kind in args.strategies:
                console.print(f"[bold]{kind}[/bold] ({label}): {args.devices} simulated devices, target loss {args.target} ...")
                results[kind] = run_one(kind, args, root / f"{kind}-{'loaded' if load else 'quiet'}", console)
        summary = summarize(results, args, label, console)
        ok = ok and summary["speedup_wallclock"] is not None
        if i == 0:
            out.update(summary)
            png = plot(results, args.target, Path(args.plot))
        else:
            out.update({f"{k}_loaded": v for k, v in summary.items()})
            png = plot(results, args.target, Path(args.plot).with_name(Path(args.plot).stem + "_loaded.png"))
        console.print(f"plot: {png}")
    out["diverged_any"] = any(r["diverged"] for key in ("strategies", "strategies_loaded") for r in out.get(key, {}).values())
    out["seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(out))
    return 0 if ok else 1


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace, label: str, console: Console) -> dict[str, Any]:
    """The table of one condition, and its numbers."""
    sync = results.get("fedavg")
    asyncs = [r for k, r in results.items() if k != "fedavg" and r["reached"]]
    best = min(asyncs, key=lambda r: r["time_to_target_s"]) if asyncs else None
    speedup = bytes_ratio = same_codec = None
    lower_bound = False
    if sync and best:
        sync_t = sync["time_to_target_s"] if sync["reached"] else args.max_seconds
        lower_bound = not sync["reached"]
        speedup = sync_t / best["time_to_target_s"]
        bytes_ratio = sync["dense_bytes_to_target"] / max(best["bytes_to_target"], 1)
        same_codec = sync["bytes_to_target"] / max(best["bytes_to_target"], 1)
    title = f"{label}: {args.devices} devices (1x/3x/10x = {args.mix}), round at 1x = {args.step_s:g} s, target loss {args.target:g}"
    table = Table(title=title)
    cols = ("strategy", "cohorts (C)", "time to target", "versions", "updates sent", "bytes sent", "dense fp32 equivalent", "final loss")
    for col in (*cols, "rejected"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for kind, r in results.items():
        table.add_row(
            kind,
            str(r["cohorts"]["concurrency"]) if r["cohorts"]["enabled"] else "-",
            f"{r['time_to_target_s']:.1f} s" if r["reached"] else "diverged" if r["diverged"] else f"> {args.max_seconds:.0f} s",
            str(r["versions_to_target"] if r["reached"] else r["versions"]),
            f"{r['updates_to_target']:,}",
            f"{r['bytes_to_target']:,}",
            f"{r['dense_bytes_to_target']:,}",
            "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
            str(sum(r["rejections"].values())),
        )
    console.print(table)
    if speedup is not None and best is not None:
        console.print(
            f"{label}: best asynchronous {best['strategy']}, {'at least ' if lower_bound else ''}{speedup:.1f}x faster than synchronous "
            f"FedAvg; {bytes_ratio:.0f}x fewer bytes than FedAvg with dense fp32 updates ({same_codec:.2f}x against FedAvg, same codec)"
        )
    sync_s = (sync["time_to_target_s"] if sync["reached"] else args.max_seconds) if sync else None
    by_strategy = {k: sync_s / r["time_to_target_s"] for k, r in results.items() if k != "fedavg" and r["reached"] and sync_s}
    return {
        "speedup_wallclock": speedup,
        "speedup_by_strategy": by_strategy,
        "speedup_is_lower_bound": lower_bound,
        "bytes_ratio": bytes_ratio,
        "bytes_ratio_same_codec": same_codec,
        "best_async": best["strategy"] if best else None,
        "strategies": {
            k: {kk: vv for kk, vv in r.items() if kk != "loss_curve"} | {"loss_curve": r["loss_curve"][::5]} for k, r in results.items()
        },
    }


if __name__ == "__main__":
    sys.exit(main())
