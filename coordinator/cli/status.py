"""``fedge-coordinator status``: one screen on the coordinator's state, read from its state directory."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from coordinator.cli.common import add_state_args, state_dir
from coordinator.cli.sites_view import format_sites, root_sites, site_self
from coordinator.cohort_privacy import recorded_sampling
from coordinator.privacy import amplified_epsilon, epsilon
from coordinator.store import Store


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="version, updates, rejections by reason, buffer, devices, recent rate")
    add_state_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def collect(path: str) -> dict[str, Any]:
    store = Store(path, readonly=True)
    try:
        now = time.time()
        version = store.current_version()
        created = store.db.execute("SELECT created FROM versions WHERE version=?", (version,)).fetchone() if version is not None else None
        recent = store.db.execute("SELECT COUNT(*) FROM ledger WHERE received >= ?", (now - 300,)).fetchone()[0]
        devices = store.devices()
        spec = store.get_meta("spec")
        counts = store.counts()
        dp = json.loads(store.get_meta("dp") or "null")
        if dp:
            parts = store.participations()
            worst = max(parts.values(), default=0)
            dp = {**dp, "epsilon_max": epsilon_of(store, dp)(worst), "max_participations": worst}
        return {
            "dp": dp,
            "cohorts": _cohorts(store, now),
            "state_dir": path,
            "version": version,
            "last_version_age_s": None if created is None else round(now - float(created["created"]), 1),
            "accepted": counts["accepted"],
            "rejected": counts["rejected"],
            "rejections": store.rejection_counts(),
            "buffered": len(store.buffered()),
            "updates_per_min_5m": round(recent / 5.0, 2),
            "devices": len(devices),
            "devices_online": sum(1 for d in devices if d["state"] not in ("offline", "unknown")),
            "spec": json.loads(spec) if spec else None,
            "server_eval": store.last_eval(),
            "sites": root_sites(store, version, now),
            "site": site_self(store),
        }
    finally:
        store.close()


def epsilon_of(store: Store, dp: dict[str, Any]) -> Callable[[int], float]:
    """A device's ε from its participations: amplified by the recorded cohorts' sampling when the
    fleet trains in cohorts (the same bound for every device, read and computed once here), else
    the composition of its participations."""
    if dp.get("amplified"):
        amplified = amplified_epsilon(recorded_sampling(store.db), dp["noise_multiplier"], dp["delta"])
        return lambda _participations: amplified
    return lambda participations: epsilon(participations, dp["noise_multiplier"], dp["delta"])


def _cohorts(store: Store, now: float) -> dict[str, Any] | None:
    """Cohorts opened, members in flight, reported and dropped (None for a fleet that never ran cohorts)."""
    if store.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='cohorts'").fetchone() is None:
        return None
    (opened,) = store.db.execute("SELECT COUNT(*) FROM cohorts").fetchone()
    if not opened:
        return None
    states = dict(store.db.execute("SELECT state, COUNT(*) FROM cohort_members GROUP BY state").fetchall())
    (in_flight,) = store.db.execute(
        "SELECT COUNT(*) FROM cohort_members m JOIN cohorts c USING (cohort) WHERE m.state = 'invited' AND c.deadline > ?", (now,)
    ).fetchone()
    last = store.db.execute("SELECT cohort, version, eligible, members FROM cohorts ORDER BY number DESC LIMIT 1").fetchone()
    return {
        "opened": int(opened),
        "in_flight": int(in_flight),
        "reported": int(states.get("reported", 0)),
        "dropped": int(states.get("dropped", 0)),
        "last": {"cohort": last[0], "version": int(last[1]), "eligible": int(last[2]), "members": len(json.loads(last[3]))},
    }


def run(args: argparse.Namespace) -> int:
    doc = collect(state_dir(args))
    if args.json:
        print(json.dumps(doc))
        return 0
    age = doc["last_version_age_s"]
    print(f"global version {doc['version']}" + (f" (made {age:.0f}s ago)" if age is not None else ""))
    rate = doc["updates_per_min_5m"]
    print(f"updates: {doc['accepted']} applied, {doc['buffered']} buffered, {doc['rejected']} rejected; {rate}/min over 5 min")
    if doc["rejections"]:
        print("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["rejections"].items())))
    print(f"devices: {doc['devices_online']} online of {doc['devices']}")
    if ev := doc["server_eval"]:
        print(f"server-side evaluation: held-out loss {ev['loss']:.4f} at v{ev['version']} ({ev['blocks']} blocks)")
    if doc["dp"]:
        dp = doc["dp"]
        if dp.get("amplified"):
            how = f"any device, amplified by the sampling of the cohorts recorded; noise multiplier {dp['noise_multiplier']:g}"
        else:
            z = dp["noise_multiplier"]
            how = f"the most-participating device, {dp['max_participations']} buffers, noise multiplier {z:g}, no amplification"
        kind = "distributed DP (inside secure aggregation)" if dp.get("distributed") else "central DP"
        print(f"{kind}: epsilon {dp['epsilon_max']:.3g} at delta {dp['delta']:g} ({how})")
    if doc["cohorts"]:
        c = doc["cohorts"]
        last = c["last"]
        print(
            f"cohorts: {c['opened']} opened, {c['in_flight']} devices in flight, {c['reported']} reported, {c['dropped']} dropped; "
            f"last {last['cohort']}: {last['members']} of {last['eligible']} eligible on v{last['version']}"
        )
    if doc["site"]:
        s = doc["site"]
        print(
            f"site: following root v{s['following']}; {s['partials']} partials forwarded ({s['device_updates_forwarded']} device "
            f"updates), {s['partials_unacked']} waiting for the root's ack; root at v{s['root_version_acked']} in its last ack"
        )
    if doc["sites"]:
        print("\n".join(format_sites(doc["sites"])))
    spec = doc["spec"] or {}
    if spec:
        extra = " + embedding table" if spec.get("embedding") else ""
        print(f"trains: LoRA r={spec.get('r')} alpha={spec.get('alpha')} on {', '.join(spec.get('targets', []))}{extra}")
    return 0
