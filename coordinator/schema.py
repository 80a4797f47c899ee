"""The coordinator database's tables, and the columns added since the first release."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    sha256 TEXT NOT NULL,
    update_id TEXT,
    delta_frame BLOB
);
CREATE TABLE IF NOT EXISTS ledger (
    update_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    applied_version INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    weight REAL NOT NULL,
    num_samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    train_loss REAL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS buffer (
    update_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    train_loss REAL,
    received REAL NOT NULL,
    frame BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolled (
    device TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dp_participation (
    device TEXT PRIMARY KEY,
    participations INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS acks (
    device TEXT PRIMARY KEY,
    update_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    version INTEGER NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'unknown',
    profile TEXT,
    last_seen REAL,
    version INTEGER,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    last_loss REAL,
    eval_loss REAL,
    metrics TEXT,
    tier TEXT
);
CREATE TABLE IF NOT EXISTS cohorts (
    cohort TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    deadline REAL NOT NULL,
    eligible INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    members TEXT NOT NULL
);
-- A site's partial aggregates committed at the root, and the device updates each one covers (coordinator.root).
CREATE TABLE IF NOT EXISTS partials (
    partial_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updates INTEGER NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS partial_updates (
    update_id TEXT PRIMARY KEY,
    partial_id TEXT NOT NULL
);
-- A site aggregator's partials (coordinator.site): kept until the root acknowledges them (payload then NULL).
CREATE TABLE IF NOT EXISTS site_partials (
    seq INTEGER PRIMARY KEY,
    partial_id TEXT NOT NULL,
    created REAL NOT NULL,
    updates INTEGER NOT NULL,
    groups INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    payload BLOB,
    acked REAL,
    root_version INTEGER
);
-- The root's view of its sites (coordinator.root): the last status each one sent up its bridge.
CREATE TABLE IF NOT EXISTS sites (
    site TEXT PRIMARY KEY,
    status TEXT,
    last_seen REAL,
    bridge TEXT,
    bridge_changed REAL
);
-- state: invited, then reported or dropped; abandoned: a secure cohort open when the coordinator restarted
-- (coordinator.cohorts); cohorts.secure (added by a migration): 1 when securely aggregated
CREATE TABLE IF NOT EXISTS evals (
    version INTEGER PRIMARY KEY,
    loss REAL NOT NULL,
    blocks INTEGER NOT NULL,
    seconds REAL NOT NULL,
    scored REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cohort_members (
    cohort TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    ts REAL,
    PRIMARY KEY (cohort, device)
);
"""


def create_or_migrate(db: sqlite3.Connection) -> None:
    """Create missing tables and add the columns an older database lacks."""
    db.executescript(SCHEMA)
    for table, column, decl in (
        ("devices", "tier", "TEXT"),
        ("ledger", "norm", "REAL"),
        ("buffer", "norm", "REAL"),
        ("enrolled", "max_samples", "INTEGER"),
        ("cohorts", "secure", "INTEGER NOT NULL DEFAULT 0"),
    ):
        columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:  # a database from before this column
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
