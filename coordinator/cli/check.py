"""``fedge-coordinator check``: is the state directory whole? The database, the version files, the fleet key.

Read-only. One ``ok``/``FAIL`` line per check; exit 0 when all pass, 3 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from compression.exitcodes import ExitCode
from coordinator.cli.common import add_state_args, state_dir


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="check the integrity of the state directory: database, version files, fleet key")
    add_state_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.set_defaults(func=run)


def check_state(root: Path) -> list[tuple[str, bool, str]]:
    """``(what, ok, detail)`` for each check, in order; later checks are skipped when the database is unusable."""
    from coordinator.errors import StoreError
    from coordinator.identity import fleet_key
    from coordinator.store import Store

    results: list[tuple[str, bool, str]] = []
    try:
        store = Store(root, readonly=True)
    except StoreError as exc:
        return [("database", False, str(exc))]
    try:
        try:
            (integrity,) = store.db.execute("PRAGMA integrity_check").fetchone()
        except sqlite3.Error as exc:
            return [("database", False, f"unreadable: {exc}")]
        results.append(("database", integrity == "ok", "integrity ok" if integrity == "ok" else str(integrity)))
        if integrity != "ok":
            return results
        try:
            current = store.current_version()
            spec = store.get_meta("spec")
            rows = store.db.execute("SELECT version, sha256 FROM versions ORDER BY version").fetchall()
        except sqlite3.Error as exc:
            return [*results, ("schema", False, f"not a coordinator database: {exc}")]
        results.append(("fleet", current is not None and spec is not None, f"version {current}" if current is not None else "no version 0"))
        try:
            json.loads(spec or "{}")
            results.append(("spec", spec is not None, "readable" if spec else "missing"))
        except ValueError as exc:
            results.append(("spec", False, f"unreadable: {exc}"))
        present = bad = 0
        missing_current = False
        for r in rows:
            path = store._path(int(r["version"]))
            if not path.exists():
                missing_current |= int(r["version"]) == current
                continue
            present += 1
            if hashlib.sha256(path.read_bytes()).hexdigest() != r["sha256"]:
                bad += 1
                results.append(("version file", False, f"{path.name} does not match its recorded sha256"))
        ok = bad == 0 and not missing_current and present > 0
        detail = (
            f"{present} version files match their sha256"
            if ok
            else f"{bad} corrupt" + (", the current one missing" if missing_current else "")
        )
        results.append(("versions", ok, detail))
        orphans = [p.name for p in store.versions_dir.glob("v*.safetensors") if current is not None and int(p.stem[1:] or 0) > current]
        if orphans:
            results.append(("orphans", True, f"{len(orphans)} uncommitted version files (left by a crash; the next start removes them)"))
    finally:
        store.close()
    try:
        fleet_key(root, create=False)
        results.append(("fleet key", True, "present"))
    except StoreError as exc:
        results.append(("fleet key", False, str(exc)))
    return results


def run(args: argparse.Namespace) -> int:
    results = check_state(Path(state_dir(args)))
    ok = all(r[1] for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [{"check": w, "ok": o, "detail": d} for w, o, d in results]}))
    else:
        for what, good, detail in results:
            print(f"{'ok  ' if good else 'FAIL'} {what}: {detail}")
    return ExitCode.OK if ok else ExitCode.STATE
