"""``fedge-coordinator serve --config FILE``: run the coordinator until SIGTERM."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the coordinator service")
    p.add_argument("--config", required=True, help="coordinator TOML config")
    p.add_argument(
        "--init",
        action="store_true",
        help="start a new fleet (version 0 and the fleet key) when the state directory holds none; without it, a missing "
        "database is an error, never a reset",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.allocator import keep_heap_pages
    from coordinator.config import load_config
    from coordinator.service import CoordinatorService

    keep_heap_pages()  # before anything large is allocated; see coordinator.allocator

    # A stop asked for while the fleet opens (systemd stopping a unit that is still starting)
    # waits until the store is open, so that the service shuts down as cleanly as ever.
    stopping: list[int] = []
    service: CoordinatorService | None = None

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stopping.append(signum)
        if service is not None:
            service.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    service = CoordinatorService(load_config(args.config), init=args.init)
    # What start-up loaded (configs, modules) lives as long as the process: the cyclic
    # collector need not walk it again at every collection of the per-update garbage.
    gc.freeze()
    if stopping:
        service.stop()
    service.run()
    return 0
