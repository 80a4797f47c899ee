"""``fedge-coordinator devices``: the devices the coordinator has seen, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.cli.sites_view import format_sites, root_sites
from coordinator.cli.status import epsilon_of
from coordinator.store import Store


def register(sub: Any) -> None:
    p = sub.add_parser("devices", help="list devices: state, last seen, version, updates")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="coordinator TOML config (its state_dir is read)")
    src.add_argument("--state-dir", help="coordinator state directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def device_rows(state_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per device, as ``devices --json`` prints them."""
    store = Store(state_dir, readonly=True)
    try:
        current = store.current_version()
        dp = json.loads(store.get_meta("dp") or "null")
        participations = store.participations() if dp else {}
        device_epsilon = epsilon_of(store, dp) if dp else None
        rows = []
        for d in store.devices():
            m = d["metrics"]
            rows.append(
                {
                    "device": d["device"],
                    "state": "offline" if d["state"] == "offline" else ("online" if d["state"] != "unknown" else "unknown"),
                    "activity": d["state"],
                    "profile": d["profile"],
                    "tier": d.get("tier"),
                    "last_seen": d["last_seen"],
                    "base_version": d["version"],
                    "staleness": None if d["version"] is None or current is None else current - d["version"],
                    "accepted": d["accepted"],
                    "rejected": d["rejected"],
                    "bytes_up": d["bytes_up"],
                    "last_loss": d["last_loss"],
                    "train_loss": m.get("train_loss"),
                    "eval_loss": d["eval_loss"],
                    "rss_mb": m.get("rss_mb"),
                    "dp_participations": participations.get(d["device"], 0) if dp else None,
                    "dp_epsilon": device_epsilon(participations.get(d["device"], 0)) if device_epsilon else None,
                }
            )
        return rows
    finally:
        store.close()


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago"


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    if args.config:
        from coordinator.config import load_config

        state_dir = load_config(args.config).state_dir
    else:
        state_dir = args.state_dir
    rows = device_rows(state_dir)
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(title=f"devices ({len(rows)})")
    columns = ("device", "state", "activity", "profile", "tier", "last seen", "base v", "stale", "accepted", "rejected", "bytes up")
    dp_on = any(r["dp_epsilon"] is not None for r in rows)
    for col in (*columns, "eval loss", "RSS MB", *(("ε",) if dp_on else ())):
        table.add_column(col, justify="right" if col not in ("device", "state", "activity", "profile", "tier") else "left")
    for r in rows:
        style = "green" if r["state"] == "online" else "red"
        table.add_row(
            r["device"],
            f"[{style}]{r['state']}[/]",
            r["activity"],
            r["profile"] or "-",
            r["tier"] or "-",
            _ago(r["last_seen"]),
            _fmt(r["base_version"]),
            _fmt(r["staleness"]),
            str(r["accepted"]),
            str(r["rejected"]),
            f"{r['bytes_up']:,}",
            _fmt(r["eval_loss"], ".4f"),
            _fmt(r["rss_mb"], ".0f"),
            *((_fmt(r["dp_epsilon"], ".3g"),) if dp_on else ()),
        )
    console = Console()
    out = console if console.is_terminal else Console(width=150)
    out.print(table)
    store = Store(state_dir, readonly=True)
    try:
        sites = root_sites(store, store.current_version(), time.time())
    finally:
        store.close()
    if sites:  # a root: its sites (rows site:<id> above are their partials' groups)
        out.print("\n".join(format_sites(sites)))
    return 0
