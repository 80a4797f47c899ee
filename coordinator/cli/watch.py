"""``fedge-coordinator watch``: a live terminal view of the fleet and of global progress.

It reads only the broker (the coordinator's retained status and every device's retained
heartbeat), so it runs from any machine that can reach the broker, with the read-only
credentials of an operator.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.cli.common import add_broker_args, broker_target
from coordinator.cli.sites_view import lag_versions
from coordinator.errors import BrokerError

SPARK = "▁▂▃▄▅▆▇█"


def register(sub: Any) -> None:
    p = sub.add_parser("watch", help="live view of devices, versions, update rate and eval loss (from the broker)")
    add_broker_args(p)
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)")
    p.add_argument("--once", action="store_true", help="print one view after --settle seconds and exit")
    p.add_argument("--settle", type=float, default=2.0, help="with --once: seconds to collect retained messages")
    p.set_defaults(func=run)


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


class Progress:
    """Update rate from the coordinator's counters, and the fleet's mean eval loss per version."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=600)
        self.loss_by_version: dict[int, list[float]] = {}

    def observe(self, view: Any) -> None:
        accepted = view.coordinator.get("accepted")
        if isinstance(accepted, int):
            self.samples.append((time.monotonic(), accepted))
        self.loss_by_version = {}
        for _t, _device, version, loss in view.history:
            self.loss_by_version.setdefault(version, []).append(loss)

    def rate_per_min(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, a0), (t1, a1) = self.samples[0], self.samples[-1]
        for t, a in self.samples:
            if t1 - t <= 60.0:
                t0, a0 = t, a
                break
        return None if t1 - t0 < 1.0 else 60.0 * (a1 - a0) / (t1 - t0)

    def loss_curve(self) -> list[float]:
        return [sum(v) / len(v) for _, v in sorted(self.loss_by_version.items())][-40:]


def render(view: Any, progress: Progress, fleet: str, where: str) -> Group:
    c = view.coordinator
    version = c.get("version")
    rate = progress.rate_per_min()
    online = sum(1 for s in view.devices.values() if s.state != "offline")
    head = Text()
    head.append(f"fedge fleet {fleet} @ {where}   ", style="bold")
    head.append(f"coordinator {c.get('state', '?')}", style="green" if c.get("state") == "online" else "red")
    head.append(f"   version {version if version is not None else '?'}   strategy {c.get('strategy', '?')}")
    head.append(f"   applied {c.get('accepted', 0)}   rejected {c.get('rejected', 0)}   buffered {c.get('buffered', 0)}")
    head.append(f"   rate {rate:.1f}/min" if rate is not None else "   rate -")
    head.append(f"   devices {online}/{len(view.devices)} online")
    curve = progress.loss_curve()
    loss_line = Text(f"mean held-out loss by version: {sparkline(curve)} {curve[-1]:.4f}" if curve else "mean held-out loss: -")
    server = c.get("server_eval")
    if isinstance(server, dict) and isinstance(server.get("loss"), int | float):
        loss_line.append(f"   server-side held-out loss {server['loss']:.4f} at v{server.get('version', '?')}", style="bold")
    elif c.get("server_eval_error"):
        loss_line.append(f"   server-side evaluation off: {str(c['server_eval_error'])[:80]}", style="red")
    rejections = c.get("rejections") or {}
    rej_line = Text("rejections: " + (", ".join(f"{k} {v}" for k, v in sorted(rejections.items())) or "none"))
    table = Table(expand=False)
    table.add_column("device", no_wrap=True, min_width=min(24, max((len(d) for d in view.devices), default=6)))
    for col in ("state", "profile"):
        table.add_column(col, no_wrap=True)
    for col in ("version", "τ", "rounds", "loss before", "loss now", "train", "bytes up", "RSS MB", "seen"):
        table.add_column(col, justify="right", no_wrap=True)
    now = time.time()
    for name, s in sorted(view.devices.items()):
        m = s.metrics
        stale = "-" if version is None or s.version is None else str(max(0, int(version) - s.version))
        style = {"training": "cyan", "offline": "red", "paused": "yellow"}.get(s.state, "green")
        table.add_row(
            name,
            f"[{style}]{s.state}[/]",
            s.profile or "-",
            "-" if s.version is None else str(s.version),
            stale,
            f"{m.get('rounds', 0):.0f}",
            f"{m['eval_loss_base']:.4f}" if "eval_loss_base" in m else "-",
            f"{m['eval_loss']:.4f}" if "eval_loss" in m else "-",
            f"{m['train_loss']:.4f}" if "train_loss" in m else "-",
            f"{m.get('bytes_up', 0):,.0f}",
            f"{m['rss_mb']:.0f}" if "rss_mb" in m else "-",
            f"{now - s.ts:.0f}s" if s.ts else "-",
        )
    parts: list[Any] = [head, loss_line, rej_line]
    if c.get("site"):
        parts.append(Text(site_line(c)))
    if view.sites:
        parts.append(sites_table(view.sites, version, now))
    return Group(*parts, table)


def site_line(c: dict[str, Any]) -> str:
    """What a site aggregator's own status says about its root."""
    return (
        f"site {c['site']}: following root v{c.get('following', '?')}, {c.get('partials_forwarded', 0)} partials forwarded "
        f"since start, {c.get('partials_unacked', 0)} waiting for the root's ack"
    )


def sites_table(sites: dict[str, dict[str, Any]], version: Any, now: float) -> Table:
    """A root's sites: online, bridge, lag in versions, devices, unacked partials, rejections, last seen."""
    table = Table(title="sites", expand=False)
    table.add_column("site", no_wrap=True)
    for col in ("aggregator", "bridge"):
        table.add_column(col, no_wrap=True)
    for col in ("lag", "devices", "accepted", "unacked", "rejected", "seen"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, entry in sorted(sites.items()):
        st = entry.get("status", {})
        state = st.get("state", "?")
        lag = lag_versions(version, st.get("following"))
        bridge = entry.get("bridge", "?")
        table.add_row(
            name,
            f"[{'green' if state == 'online' else 'red'}]{state}[/]",
            f"[{'green' if bridge == 'up' else 'red'}]{bridge}[/]",
            "-" if lag is None else str(lag),
            str(st.get("devices_online", "-")),
            str(st.get("accepted", "-")),
            str(st.get("partials_unacked", "-")),
            str(st.get("rejected", "-")),
            f"{now - entry['seen']:.0f}s" if "seen" in entry else "-",
        )
    return table


def run(args: argparse.Namespace) -> int:
    from coordinator.monitor import FleetMonitor

    host, port, fleet, user, password = broker_target(args)
    try:
        monitor = FleetMonitor(host, port, fleet, username=user, password=password)
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    progress = Progress()
    where = f"{host}:{port}"
    console = Console()
    try:
        if args.once:
            time.sleep(args.settle)
            view = monitor.poll()
            progress.observe(view)
            console.print(render(view, progress, fleet, where))
            return 0
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        with Live(console=console, refresh_per_second=max(1.0, 1.0 / args.refresh), screen=True, auto_refresh=False) as live:
            while deadline is None or time.monotonic() < deadline:
                view = monitor.poll()
                progress.observe(view)
                live.update(render(view, progress, fleet, where), refresh=True)
                time.sleep(args.refresh)
    except KeyboardInterrupt:
        pass
    finally:
        monitor.close()
    return 0
