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

from compression.exitcodes import EXIT_CODE_TABLE, ExitCode
from edge_agent.config import load_config
from edge_agent.errors import AgentError

log = logging.getLogger("edge_agent")


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent
    from edge_agent.sdnotify import Notifier

    cfg = load_config(args.config)
    agent = Agent(cfg, Notifier())

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current step and stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    agent.run()
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from edge_agent.check import run_checks

    return run_checks(args.config, skip_model=args.skip_model, broker_timeout=args.timeout)


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_agent.check import show_status

    return show_status(args.config, as_json=args.json)


def _cmd_unit(args: argparse.Namespace) -> int:
    from edge_agent.unit import render_unit

    sys.stdout.write(render_unit(args.profile, config=args.agent_config, venv=args.venv))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from edge_agent import tiny

    return tiny.main(["--out", args.out, "--text-dir", args.text_dir, "--seed", str(args.seed)])


def _cmd_generate(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from edge_agent.errors import ConfigError
    from edge_agent.inference import LocalModel

    if args.prompt is None and args.prompt_file is None:
        raise ConfigError("give --prompt TEXT or --prompt-file FILE")
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except OSError as exc:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror}") from None
    lm = LocalModel(args.model, threads=args.threads)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if not args.json:
        sys.stdout.write(prompt)
    gen = lm.generate(
        prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed, on_token=None if args.json else stream
    )
    if args.json:
        print(json.dumps(asdict(gen)))
    else:
        sys.stdout.write("\n")
        log.info(
            "%d prompt tokens, prefill %.0f ms, %d new tokens at %.1f ms/token (%s)",
            gen.prompt_tokens,
            gen.prefill_ms,
            len(gen.tokens),
            gen.decode_ms_per_token,
            gen.stopped,
        )
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from edge_agent import onnx_export

    argv = ["--model", args.model, "--out", args.out, "--threads", str(args.threads)]
    return onnx_export.main(argv + (["--no-quantize"] if args.no_quantize else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge-agent",
        description="fedge edge agent",
        epilog="exit codes:\n" + EXIT_CODE_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", required=True, help="agent TOML config")
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check", help="validate the config, state, data, broker and model, and say plainly what is wrong")
    check.add_argument("--config", required=True, help="agent TOML config")
    check.add_argument("--skip-model", action="store_true", help="skip loading the model (the slowest check)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker's CONNACK")
    check.set_defaults(func=_cmd_check)
    status = sub.add_parser("status", help="the agent's last heartbeat, outbox and state, read from its state directory")
    status.add_argument("--config", required=True, help="agent TOML config")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    unit = sub.add_parser("systemd-unit", help="print the systemd unit with MemoryMax and CPU settings from a device profile")
    unit.add_argument("--profile", required=True, help="device profile name or .toml path")
    unit.add_argument("--agent-config", default="/etc/fedge/agent.toml", help="config path the unit passes to `run`")
    unit.add_argument("--venv", default="/opt/fedge/venv", help="virtualenv holding fedge")
    unit.set_defaults(func=_cmd_unit)
    gen = sub.add_parser("generate", help="generate text locally with an exported ONNX model (onnxruntime, KV cache)")
    gen.add_argument("--model", required=True, help="directory from `fedge-coordinator export --format onnx` (its onnx/ folder)")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, default=2)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the text")
    gen.set_defaults(func=_cmd_generate)
    exp = sub.add_parser("export-onnx", help="export a merged model directory to ONNX (KV cache, 8-bit), checked against torch")
    exp.add_argument("--model", required=True, help="merged model directory (e.g. from `fedge-coordinator export --merged`)")
    exp.add_argument("--out", required=True, help="new directory to write")
    exp.add_argument("--no-quantize", action="store_true", help="keep fp32 weights")
    exp.add_argument("--threads", type=int, default=2)
    exp.set_defaults(func=_cmd_export_onnx)
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
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
