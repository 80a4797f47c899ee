"""``fedge-agent``: the device daemon's command line.

Exit codes: 0 clean stop, 1 internal error, 2 bad config, 3 model error, 4 data error,
5 broker error, 6 unreadable state directory, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from edge_agent.config import load_config
from edge_agent.errors import AgentError

log = logging.getLogger("edge_agent")


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    cfg = load_config(args.config)
    agent = Agent(cfg)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current step and stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    agent.run()
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from edge_agent import tiny

    return tiny.main(["--out", args.out, "--text-dir", args.text_dir, "--seed", str(args.seed)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge-agent", description="fedge edge agent")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", required=True, help="agent TOML config")
    run.set_defaults(func=_cmd_run)
    tiny = sub.add_parser("make-tiny-model", help="build the tiny test model from a text directory")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--text-dir", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    from edge_agent.memory import tune_allocator

    tune_allocator()  # before anything large is allocated; see edge_agent.memory
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except AgentError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
