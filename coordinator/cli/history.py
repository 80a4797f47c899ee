"""``fedge-coordinator history``: each global version with the updates it took (and its server-side score
under ``[eval]``), and a staleness histogram."""

from __future__ import annotations

import argparse
import collections
import json
from typing import Any

from coordinator.cli.common import add_state_args, state_dir
from coordinator.store import Store


def register(sub: Any) -> None:
    p = sub.add_parser("history", help="versions with their contributing updates; staleness histogram")
    add_state_args(p)
    p.add_argument("--last", type=int, default=20, help="versions shown (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def collect(path: str, last: int) -> dict[str, Any]:
    store = Store(path, readonly=True)
    try:
        versions = [dict(r) for r in store.db.execute("SELECT version, created FROM versions ORDER BY version DESC LIMIT ?", (last or -1,))]
        versions.reverse()
        by_version: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        lo = versions[0]["version"] if versions else 0
        for e in store.db.execute(
            "SELECT applied_version, device, seq, base_version, staleness, weight, num_samples, bytes, train_loss "
            "FROM ledger WHERE applied_version >= ? ORDER BY applied_version",
            (lo,),
        ):
            by_version[e["applied_version"]].append({k: e[k] for k in e.keys() if k != "applied_version"})
        rows = store.db.execute("SELECT staleness, COUNT(*) AS n FROM ledger GROUP BY staleness")
        histogram = {int(r["staleness"]): int(r["n"]) for r in rows}
        scores = store.evals(lo)
        return {
            "versions": [
                {
                    "version": v["version"],
                    "created": v["created"],
                    "updates": by_version.get(v["version"], []),
                    "server_eval_loss": scores[v["version"]]["loss"] if v["version"] in scores else None,
                }
                for v in versions
            ],
            "staleness_histogram": dict(sorted(histogram.items())),
        }
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    doc = collect(state_dir(args), args.last)
    if args.json:
        print(json.dumps(doc))
        return 0
    for v in doc["versions"]:
        ups = v["updates"]
        desc = ", ".join(f"{u['device']}#{u['seq']} (τ={u['staleness']}, w={u['weight']:.3f})" for u in ups[:6])
        more = f" and {len(ups) - 6} more" if len(ups) > 6 else ""
        score = f"  [held-out {v['server_eval_loss']:.4f}]" if v["server_eval_loss"] is not None else ""
        print(f"v{v['version']:<6} {len(ups):3d} update(s): {desc or 'initial state'}{more}{score}")
    hist = doc["staleness_histogram"]
    if hist:
        peak = max(hist.values())
        print("\nstaleness of applied updates:")
        for tau, n in hist.items():
            print(f"  τ={tau:<4d} {n:6d} {'█' * max(1, round(40 * n / peak))}")
    return 0
