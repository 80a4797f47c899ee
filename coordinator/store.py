"""Durable coordinator state: SQLite (WAL) for registry and ledger, safetensors for versions.

Commit protocol for a new version ``N``:

1. write ``versions/vN.safetensors`` atomically (temp file, fsync, rename, fsync dir): the
   global state and the downlink error-feedback residual, together;
2. in one SQLite transaction insert the version row (with the published delta frame) and
   the ledger rows of the updates it aggregates (moving them out of the buffer);
3. only then acknowledge the updates to the broker.

Updates that wait for aggregation (FedBuff, FedAvg rounds) are first written to the
``buffer`` table, frame included, and acknowledged after that commit; a restart reloads
the buffer. The service groups the messages it finds queued into one transaction
(:meth:`Store.batch`), so that one fsync covers many updates.

The SQLite commit is the commit point. A crash before it leaves an orphan file that the
next start ignores and overwrites; a crash after it but before the acknowledgement makes
the broker redeliver, and the ledger or the buffer recognises the update id as a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from coordinator.errors import StoreError
from coordinator.registry import FleetRecords
from coordinator.schema import create_or_migrate

log = logging.getLogger(__name__)

RESIDUAL_PREFIX = "__downlink_residual__/"
STRATEGY_PREFIX = "__strategy__/"
"""Tensors of the strategy's state (a server optimizer's moments), stored with the version they belong to."""


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class LedgerEntry:
    update_id: str
    device: str
    seq: int
    base_version: int
    staleness: int
    weight: float
    num_samples: int
    size: int
    train_loss: float | None
    norm: float | None = None
    """L2 norm of the update as received (the adaptive norm bound learns from it)."""


@dataclass(frozen=True)
class BufferedUpdate:
    """An accepted update waiting for aggregation, as stored (frame and all)."""

    entry: LedgerEntry
    frame: bytes


class Store(FleetRecords):
    """The coordinator's state directory: ``coordinator.db`` and ``versions/``."""

    def __init__(self, root: str | Path, *, readonly: bool = False, create: bool = False) -> None:
        """Open the state directory. Without ``create``, a missing or empty database is an
        error, never a fresh start; with it, a database is created only where no version
        files exist, so that a lost database is never silently replaced by an empty one."""
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        db = self.root / "coordinator.db"
        self._batch_depth = 0
        self._pending_prune: tuple[int, int] | None = None
        try:
            fresh = not db.exists() or db.stat().st_size == 0
        except OSError as exc:
            raise StoreError(f"cannot read {db}: {exc.strerror}") from None
        if fresh and (readonly or not create):
            what = "missing" if not db.exists() else "empty"
            raise StoreError(f"no coordinator state in {self.root} ({db.name} is {what}); start a new fleet with `serve --init`")
        if fresh:
            stored = sorted(self.versions_dir.glob("v*.safetensors")) if self.versions_dir.is_dir() else []
            if stored:
                raise StoreError(
                    f"{db} is missing or empty but {self.versions_dir} holds {len(stored)} version files: "
                    "restore the database from a backup, or move versions/ away to start a new fleet"
                )
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0, check_same_thread=False)
                self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            else:
                self._open_writable(db, fresh)
        except sqlite3.Error as exc:
            raise StoreError(f"{db} is not a usable coordinator database ({exc}); run `fedge-coordinator check`") from None
        self.db.row_factory = sqlite3.Row

    def _open_writable(self, db: Path, fresh: bool) -> None:
        try:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.versions_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)  # left by a kill -9 during a write
        except OSError as exc:
            raise StoreError(f"cannot write {self.versions_dir}: {exc.strerror}") from None
        # One owner at a time (the service worker); it may be created on another thread.
        self.db = sqlite3.connect(str(db), timeout=10.0, isolation_level=None, check_same_thread=False)
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not fresh and "meta" not in tables:
            self.db.close()
            raise StoreError(f"{db} holds no coordinator tables; it is not this fleet's database")
        if not fresh:
            (check,) = self.db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                self.db.close()
                raise StoreError(f"{db} is corrupt ({check}); restore it from a backup")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        create_or_migrate(self.db)

    def close(self) -> None:
        self.db.close()

    # -- versions --------------------------------------------------------------------

    def _path(self, version: int) -> Path:
        return self.versions_dir / f"v{version:08d}.safetensors"

    def current_version(self) -> int | None:
        row = self.db.execute("SELECT MAX(version) AS v FROM versions").fetchone()
        return None if row["v"] is None else int(row["v"])

    def load_version(self, version: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The global state of ``version`` and the downlink residual saved with it."""
        state, residual, _strategy = self.load_version_full(version)
        return state, residual

    def load_version_full(self, version: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The global state of ``version``, its downlink residual and the strategy's state saved with it."""
        path = self._path(version)
        row = self.db.execute("SELECT sha256 FROM versions WHERE version=?", (version,)).fetchone()
        if row is None or not path.exists():
            raise StoreError(f"version {version} is not stored in {self.versions_dir}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise StoreError(f"{path} does not match its recorded sha256; the state directory is corrupt")
        parts: dict[str, dict[str, np.ndarray]] = {"": {}, RESIDUAL_PREFIX: {}, STRATEGY_PREFIX: {}}
        for k, v in load(data).items():
            prefix = next((p for p in (RESIDUAL_PREFIX, STRATEGY_PREFIX) if k.startswith(p)), "")
            parts[prefix][k[len(prefix) :]] = v.astype(np.float32)
        return parts[""], parts[RESIDUAL_PREFIX], parts[STRATEGY_PREFIX]

    def delta_frame(self, version: int) -> tuple[int, bytes] | None:
        """The global-delta frame published for ``version`` and the version it applies to (the last
        one before it with a state of its own); None for version 0 or pruned ones."""
        row = self.db.execute("SELECT delta_frame FROM versions WHERE version=?", (version,)).fetchone()
        if row is None or row["delta_frame"] is None:
            return None
        base = self.db.execute("SELECT MAX(version) FROM versions WHERE version<? AND sha256!=''", (version,)).fetchone()[0]
        return None if base is None else (int(base), bytes(row["delta_frame"]))

    def merged_version(self, version: int, update_id: str | None) -> None:
        """Record ``version`` as made inside a batch whose last version carries its step: it has
        ledger rows but no state of its own (an empty sha256), and it was never published."""
        row = (version, time.time(), update_id)
        self.db.execute("INSERT INTO versions(version, created, sha256, update_id, delta_frame) VALUES (?,?,'',?,NULL)", row)

    def commit_version(
        self,
        version: int,
        state: dict[str, np.ndarray],
        entry: LedgerEntry | list[LedgerEntry] | None,
        keep: int,
        *,
        residual: dict[str, np.ndarray] | None = None,
        delta_frame: bytes | None = None,
        strategy_state: dict[str, np.ndarray] | None = None,
        update_id: str | None = None,
    ) -> None:
        """Durably record ``version`` and the updates that made it (taken out of the buffer);
        ``update_id`` names the update that completed it (by default the last of ``entry``).

        Inside :meth:`batch` the rows join the batch's transaction, whose commit is then
        the commit point."""
        entries = [] if entry is None else [entry] if isinstance(entry, LedgerEntry) else list(entry)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
        tensors.update({RESIDUAL_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (residual or {}).items()})
        tensors.update({STRATEGY_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (strategy_state or {}).items()})
        data = save(dict(sorted(tensors.items())))
        atomic_write(self._path(version), data)
        now = time.time()
        with self._tx():
            self.db.execute(
                "INSERT INTO versions(version, created, sha256, update_id, delta_frame) VALUES (?,?,?,?,?)",
                (version, now, hashlib.sha256(data).hexdigest(), update_id or (entries[-1].update_id if entries else None), delta_frame),
            )
            self.record_ledger(entries, version, now)
            oldest = self.db.execute(  # the oldest of the last `keep` versions that have a state (and a delta) of their own
                "SELECT version FROM versions WHERE sha256!='' ORDER BY version DESC LIMIT 1 OFFSET ?", (keep - 1,)
            ).fetchone()
            if oldest is not None:
                self.db.execute("UPDATE versions SET delta_frame=NULL WHERE version<? AND delta_frame IS NOT NULL", (oldest[0],))
        # Files of older versions go only once this version is committed: inside a batch, the
        # last committed version may be one that a later, uncommitted version would prune.
        self._pending_prune = (version, keep)
        if not self.in_batch:
            self._flush_prune()

    def _flush_prune(self) -> None:
        if self._pending_prune is not None:
            version, keep = self._pending_prune
            self._pending_prune = None
            self._prune(version, keep)

    def _prune(self, version: int, keep: int) -> None:
        files: dict[int, Path] = {}
        for path in self.versions_dir.glob("v*.safetensors"):
            try:
                files[int(path.stem[1:])] = path
            except ValueError:
                continue
        kept = sorted(v for v in files if v <= version)[-keep:]
        for v, path in files.items():
            if v not in kept:
                path.unlink(missing_ok=True)  # older than the last `keep` files, or an orphan of a crash

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    @property
    def in_batch(self) -> bool:
        return self._batch_depth > 0

    def batch(self) -> _Transaction:
        """One transaction around many writes (group commit); writes inside it join it."""
        return _Transaction(self)

    # -- ledger and registry ---------------------------------------------------------

    def is_applied(self, update_id: str) -> bool:
        """Whether the update is in the ledger or waiting in the buffer (a redelivery is a duplicate)."""
        if self.db.execute("SELECT 1 FROM ledger WHERE update_id=?", (update_id,)).fetchone() is not None:
            return True
        return self.db.execute("SELECT 1 FROM buffer WHERE update_id=?", (update_id,)).fetchone() is not None

    def add_to_buffer(self, entry: LedgerEntry, frame: bytes) -> None:
        """Durably keep an accepted update until its aggregation."""
        with self._tx():
            self.db.execute(
                "INSERT INTO buffer(update_id, device, seq, base_version, staleness, num_samples, bytes, train_loss, received, frame, "
                "norm) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    entry.update_id,
                    entry.device,
                    entry.seq,
                    entry.base_version,
                    entry.staleness,
                    entry.num_samples,
                    entry.size,
                    entry.train_loss,
                    time.time(),
                    frame,
                    entry.norm,
                ),
            )

    def buffered(self) -> list[BufferedUpdate]:
        """The buffer, oldest first."""
        out = []
        for r in self.db.execute("SELECT * FROM buffer ORDER BY received, rowid"):
            entry = LedgerEntry(
                update_id=r["update_id"],
                device=r["device"],
                seq=r["seq"],
                base_version=r["base_version"],
                staleness=r["staleness"],
                weight=0.0,
                num_samples=r["num_samples"],
                size=r["bytes"],
                train_loss=r["train_loss"],
                norm=r["norm"],
            )
            out.append(BufferedUpdate(entry, bytes(r["frame"])))
        return out

    def drop_buffer(self, reason: str) -> int:
        """Empty the buffer, recording each update as rejected with ``reason`` (e.g. a closed FedAvg round)."""
        rows = self.db.execute("SELECT update_id, device FROM buffer").fetchall()
        with self._tx():
            for r in rows:
                self.record_rejection(r["device"], reason, f"update {r['update_id']} dropped from the buffer")
            self.db.execute("DELETE FROM buffer")
        return len(rows)

    def recent_norms(self, n: int) -> list[float]:
        """Norms of the last ``n`` applied or buffered updates, oldest first."""
        rows = self.db.execute(
            "SELECT norm FROM (SELECT norm, received FROM ledger WHERE norm IS NOT NULL "
            "UNION ALL SELECT norm, received FROM buffer WHERE norm IS NOT NULL) ORDER BY received DESC LIMIT ?",
            (n,),
        ).fetchall()
        return [float(r["norm"]) for r in reversed(rows)]

    def last_samples(self) -> dict[str, int]:
        """Each device's sample count as weighted in its last applied update."""
        rows = self.db.execute("SELECT device, num_samples FROM ledger WHERE rowid IN (SELECT MAX(rowid) FROM ledger GROUP BY device)")
        return {r["device"]: int(r["num_samples"]) for r in rows}

    # -- savepoints: one message's writes inside a batch ------------------------------

    def savepoint(self) -> None:
        self.db.execute("SAVEPOINT message")

    def release(self) -> None:
        self.db.execute("RELEASE message")

    def rollback_to_savepoint(self) -> None:
        self.db.execute("ROLLBACK TO message")
        self.db.execute("RELEASE message")

    def ledger(self) -> Iterator[dict[str, Any]]:
        for r in self.db.execute("SELECT * FROM ledger ORDER BY applied_version"):
            yield dict(r)


class _Transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT``; nested uses join the outermost transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> None:
        if self.store._batch_depth == 0:
            self.store.db.execute("BEGIN IMMEDIATE")
        self.store._batch_depth += 1

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.store._batch_depth -= 1
        if self.store._batch_depth > 0:
            return
        db = self.store.db
        if exc_type is None:
            try:
                db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()  # a failed COMMIT (a full disk) leaves the transaction open
                raise
            self.store._flush_prune()
        else:
            self._rollback()

    def _rollback(self) -> None:
        self.store._pending_prune = None
        if self.store.db.in_transaction:
            try:
                self.store.db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("rollback failed: %s", exc)
