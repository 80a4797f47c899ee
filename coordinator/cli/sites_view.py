"""What ``status`` and ``devices`` show about sites, read from a state directory.

At a root: each enrolled site that has sent a status or a partial, with what its own status
says (online, the version it follows, its devices online, its unacknowledged partials and
rejections), its bridge's state, and what the root committed of it (partials, device
updates, the last one's age). At a site: what it forwarded and what waits for the root."""

from __future__ import annotations

import json
from typing import Any

from coordinator.store import Store


def lag_versions(version: object, following: object) -> int | None:
    """Root versions a site has not reached, from its status (None when either is unknown or not a number)."""
    if type(version) is not int or type(following) is not int:
        return None
    return max(0, version - following)


def _has(store: Store, table: str) -> bool:
    return store.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def root_sites(store: Store, version: int | None, now: float) -> list[dict[str, Any]]:
    """One row per site at a root (empty for a fleet without sites)."""
    if not _has(store, "sites") or not _has(store, "partials"):
        return []
    committed = {
        r[0]: (int(r[1]), int(r[2] or 0), float(r[3]))
        for r in store.db.execute("SELECT site, COUNT(*), SUM(updates), MAX(received) FROM partials GROUP BY site")
    }
    seen = {r[0]: (r[1], r[2], r[3]) for r in store.db.execute("SELECT site, status, last_seen, bridge FROM sites")}
    rows = []
    for site in sorted(set(committed) | set(seen)):
        raw, last_seen, bridge = seen.get(site, (None, None, None))
        try:
            status = json.loads(raw) if raw else {}
        except ValueError:
            status = {}
        partials, updates, last = committed.get(site, (0, 0, None))
        following = status.get("following")
        rows.append(
            {
                "site": site,
                "aggregator": status.get("state", "unknown"),
                "bridge": bridge or "unknown",
                "following": following,
                "lag_versions": lag_versions(version, following),
                "devices_online": status.get("devices_online"),
                "site_accepted": status.get("accepted"),
                "site_rejected": status.get("rejected"),
                "partials_unacked": status.get("partials_unacked"),
                "partials": partials,
                "device_updates": updates,
                "last_partial_age_s": None if last is None else round(now - last, 1),
                "status_age_s": None if last_seen is None else round(now - float(last_seen), 1),
            }
        )
    return rows


def site_self(store: Store) -> dict[str, Any] | None:
    """A site aggregator's own record of its partials (None at a root or a single coordinator)."""
    if not _has(store, "site_partials"):
        return None
    made, unacked, updates, root_version = store.db.execute(
        "SELECT COUNT(*), SUM(acked IS NULL), SUM(updates), MAX(root_version) FROM site_partials"
    ).fetchone()
    followed = json.loads(store.get_meta("site_followed") or "null")
    if not made and followed is None:
        return None
    return {
        "partials": int(made),
        "partials_unacked": int(unacked or 0),
        "device_updates_forwarded": int(updates or 0),
        "root_version_acked": root_version,
        "following": followed.get("version") if isinstance(followed, dict) else None,
    }


def format_sites(rows: list[dict[str, Any]]) -> list[str]:
    def v(x: Any) -> str:
        return "-" if x is None else str(x)

    out = [f"sites: {sum(r['aggregator'] == 'online' for r in rows)} of {len(rows)} online"]
    for r in rows:
        out.append(
            f"  {r['site']}: aggregator {r['aggregator']}, bridge {r['bridge']}, lag {v(r['lag_versions'])} versions, "
            f"{v(r['devices_online'])} devices online, {r['partials']} partials ({r['device_updates']} device updates) committed, "
            f"{v(r['partials_unacked'])} unacked, {v(r['site_rejected'])} rejected at the site"
        )
    return out
