"""The fleet's records in the coordinator database: the ledger, devices, identities, acknowledgements,
rejections, DP participation and settings. Mixed into :class:`coordinator.store.Store`, whose
transactions they join."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.store import LedgerEntry


class FleetRecords:
    """Queries and writes on the registry tables; needs ``db`` and ``_tx`` from the store."""

    db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def record_ledger(self, entries: list[LedgerEntry], version: int, now: float | None = None) -> None:
        """The ledger rows of ``entries``, taken out of the buffer, as part of ``version`` (at a site: forwarded at it)."""
        now = time.time() if now is None else now
        for e in entries:
            self.db.execute("DELETE FROM buffer WHERE update_id=?", (e.update_id,))
            self.db.execute(
                "INSERT INTO ledger(update_id, device, seq, base_version, applied_version, staleness, weight, num_samples, "
                "bytes, train_loss, received, norm) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    e.update_id,
                    e.device,
                    e.seq,
                    e.base_version,
                    version,
                    e.staleness,
                    e.weight,
                    e.num_samples,
                    e.size,
                    e.train_loss,
                    now,
                    e.norm,
                ),
            )
            self.db.execute(
                "INSERT INTO devices(device, accepted, bytes_up, last_loss, last_seen) VALUES (?,1,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET accepted=accepted+1, bytes_up=bytes_up+excluded.bytes_up, "
                "last_loss=COALESCE(excluded.last_loss, last_loss), last_seen=excluded.last_seen",
                (e.device, e.size, e.train_loss, now),
            )

    def record_rejection(self, device: str | None, reason: str, detail: str) -> None:
        now = time.time()
        with self._tx():
            self.db.execute("INSERT INTO rejections(device, reason, detail, ts) VALUES (?,?,?,?)", (device, reason, detail[:500], now))
            if device is not None:
                self.db.execute(
                    "INSERT INTO devices(device, rejected, last_seen) VALUES (?,1,?) "
                    "ON CONFLICT(device) DO UPDATE SET rejected=rejected+1, last_seen=excluded.last_seen",
                    (device, now),
                )

    def record_status(
        self, device: str, state: str, version: int | None, profile: str | None, metrics: dict[str, float], tier: str | None = None
    ) -> None:
        now = time.time()
        with self._tx():
            self.db.execute(
                "INSERT INTO devices(device, state, profile, last_seen, version, eval_loss, metrics, tier) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET state=excluded.state, profile=COALESCE(excluded.profile, profile), "
                "last_seen=excluded.last_seen, version=COALESCE(excluded.version, version), "
                "eval_loss=COALESCE(excluded.eval_loss, eval_loss), metrics=COALESCE(excluded.metrics, metrics), "
                "tier=COALESCE(excluded.tier, tier)",
                (device, state, profile, now, version, metrics.get("eval_loss"), json.dumps(metrics) if metrics else None, tier),
            )

    def devices(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM devices ORDER BY device").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
            out.append(d)
        return out

    def rejection_counts(self) -> dict[str, int]:
        return {r["reason"]: r["n"] for r in self.db.execute("SELECT reason, COUNT(*) AS n FROM rejections GROUP BY reason")}

    def counts(self) -> dict[str, int]:
        accepted = self.db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
        rejected = self.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
        versions = self.db.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
        return {"accepted": int(accepted), "rejected": int(rejected), "versions": int(versions)}

    def record_ack(self, device: str, update_id: str, seq: int, outcome: str, reason: str | None, version: int) -> None:
        """The last update of ``device`` that was processed (in the batch's transaction)."""
        with self._tx():
            self.db.execute(
                "INSERT INTO acks(device, update_id, seq, outcome, reason, version, ts) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET update_id=excluded.update_id, seq=excluded.seq, outcome=excluded.outcome, "
                "reason=excluded.reason, version=excluded.version, ts=excluded.ts",
                (device, update_id, seq, outcome, None if reason is None else reason[:500], version, time.time()),
            )

    def last_ack(self, device: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM acks WHERE device=?", (device,)).fetchone()
        return None if row is None else dict(row)

    # -- identities --------------------------------------------------------------------

    def enroll(self, device: str, public_key: bytes, max_samples: int | None = None) -> None:
        """Register (or re-register after a revocation) a device's Ed25519 public key."""
        with self._tx():
            self.db.execute(
                "INSERT INTO enrolled(device, public_key, created, max_samples) VALUES (?,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET public_key=excluded.public_key, created=excluded.created, revoked=NULL, "
                "max_samples=excluded.max_samples",
                (device, public_key, time.time(), max_samples),
            )

    def revoke(self, device: str) -> bool:
        with self._tx():
            cur = self.db.execute("UPDATE enrolled SET revoked=? WHERE device=? AND revoked IS NULL", (time.time(), device))
        return cur.rowcount > 0

    def identity(self, device: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM enrolled WHERE device=?", (device,)).fetchone()
        return None if row is None else dict(row)

    def advance_seq(self, device: str, seq: int) -> None:
        """Record the newest accepted sequence number of an enrolled device (replay protection)."""
        with self._tx():
            self.db.execute("UPDATE enrolled SET last_seq=MAX(last_seq, ?) WHERE device=?", (seq, device))

    # -- differential privacy ------------------------------------------------------------

    def add_participations(self, devices: list[str]) -> None:
        """One more DP-FedBuff buffer for each device (in the version's transaction when batched)."""
        with self._tx():
            for d in devices:
                self.db.execute(
                    "INSERT INTO dp_participation(device, participations) VALUES (?,1) "
                    "ON CONFLICT(device) DO UPDATE SET participations=participations+1",
                    (d,),
                )

    def participations(self) -> dict[str, int]:
        return {r["device"]: int(r["participations"]) for r in self.db.execute("SELECT device, participations FROM dp_participation")}

    # -- server-side evaluation ([eval]) ---------------------------------------------------

    def record_eval(self, version: int, loss: float, blocks: int, seconds: float) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO evals(version, loss, blocks, seconds, scored) VALUES (?,?,?,?,?) ON CONFLICT(version) DO UPDATE SET "
                "loss=excluded.loss, blocks=excluded.blocks, seconds=excluded.seconds, scored=excluded.scored",
                (version, loss, blocks, seconds, time.time()),
            )

    def _has_evals(self) -> bool:
        """A database from before ``[eval]`` opened read-only has no such table (yet)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='evals'").fetchone() is not None

    def evals(self, since: int = 0) -> dict[int, dict[str, Any]]:
        """Server-side scores by version, from ``since`` on."""
        if not self._has_evals():
            return {}
        rows = self.db.execute("SELECT version, loss, blocks, seconds, scored FROM evals WHERE version >= ? ORDER BY version", (since,))
        return {int(r["version"]): dict(r) for r in rows}

    def last_eval(self) -> dict[str, Any] | None:
        if not self._has_evals():
            return None
        row = self.db.execute("SELECT version, loss, blocks, seconds, scored FROM evals ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else dict(row)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT INTO meta(key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))
