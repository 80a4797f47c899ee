"""``fedge-coordinator``: the coordinator service and the operator CLI, one module per command.

Exit codes: 0 success, 1 internal error, 2 bad config or arguments, 3 state directory
unusable, 5 broker unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sqlite3
import sys

from compression.exitcodes import EXIT_CODE_TABLE, ExitCode
from coordinator.cli import acl, check, cmd, demo, devices, enroll, export, history, serve, status, testbed, watch
from coordinator.errors import CoordinatorError

log = logging.getLogger("coordinator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge-coordinator",
        description="fedge coordinator and operator CLI",
        epilog="exit codes:\n" + EXIT_CODE_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (serve, check, acl, status, devices, watch, history, cmd, export, enroll, demo, testbed):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CoordinatorError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except sqlite3.Error as exc:
        log.error("the coordinator database failed: %s (run `fedge-coordinator check`)", exc)
        return ExitCode.STATE
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            log.error("cannot write the state directory: %s", exc)
            return ExitCode.STATE
        raise
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
