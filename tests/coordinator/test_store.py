"""Version persistence and the ledger, on a real SQLite file."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import StoreError
from coordinator.store import LedgerEntry, Store


def _entry(uid: str, device: str = "d1") -> LedgerEntry:
    return LedgerEntry(
        update_id=uid, device=device, seq=1, base_version=0, staleness=0, weight=0.5, num_samples=4, size=100, train_loss=1.0
    )


def test_versions_survive_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    store.commit_version(0, {"w": np.zeros(3, np.float32)}, None, keep=5)
    store.commit_version(1, {"w": np.arange(3, dtype=np.float32)}, _entry("u1"), keep=5)
    store.close()
    again = Store(tmp_path, create=True)
    assert again.current_version() == 1
    state, residual = again.load_version(1)
    np.testing.assert_array_equal(state["w"], [0, 1, 2])
    assert residual == {}
    assert again.is_applied("u1") and not again.is_applied("u2")
    assert again.counts() == {"accepted": 1, "rejected": 0, "versions": 2}
    assert again.devices()[0]["accepted"] == 1


def test_old_snapshots_are_pruned_and_orphans_removed(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    orphan = store.versions_dir / "v00000009.safetensors"
    orphan.write_bytes(b"left by a crash before the commit")
    for v in range(5):
        store.commit_version(v, {"w": np.full(2, v, np.float32)}, None, keep=2)
    files = sorted(p.name for p in store.versions_dir.glob("*.safetensors"))
    assert files == ["v00000003.safetensors", "v00000004.safetensors"]


def test_a_corrupt_snapshot_is_detected(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    store.commit_version(0, {"w": np.zeros(3, np.float32)}, None, keep=5)
    path = store.versions_dir / "v00000000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        store.load_version(0)


def test_a_duplicate_update_cannot_be_committed_twice(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    store.commit_version(0, {"w": np.zeros(1, np.float32)}, None, keep=5)
    store.commit_version(1, {"w": np.ones(1, np.float32)}, _entry("u1"), keep=5)
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_version(2, {"w": np.ones(1, np.float32)}, _entry("u1"), keep=5)
    assert store.current_version() == 1


def test_rejections_and_statuses_are_counted(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    store.record_rejection("d1", "bad_checksum", "frame checksum mismatch")
    store.record_status("d1", "training", 3, "laptop", {"eval_loss": 2.5, "rss_mb": 100.0})
    assert store.rejection_counts() == {"bad_checksum": 1}
    (dev,) = store.devices()
    assert (dev["rejected"], dev["state"], dev["version"], dev["eval_loss"]) == (1, "training", 3, 2.5)


def test_readonly_open_of_a_missing_store_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no coordinator state"):
        Store(tmp_path / "nowhere", readonly=True)


def test_residual_and_delta_frame_are_stored_with_the_version(tmp_path: Path) -> None:
    store = Store(tmp_path, create=True)
    store.commit_version(0, {"w": np.zeros(2, np.float32)}, None, keep=2)
    for v in (1, 2, 3):
        store.commit_version(
            v, {"w": np.full(2, v, np.float32)}, None, keep=2, residual={"w": np.full(2, -v, np.float32)}, delta_frame=b"frame%d" % v
        )
    state, residual = Store(tmp_path, create=True).load_version(3)
    np.testing.assert_array_equal(residual["w"], [-3, -3])
    assert set(state) == {"w"}
    assert store.delta_frame(3) == (2, b"frame3") and store.delta_frame(2) == (1, b"frame2")
    assert store.delta_frame(1) is None and store.delta_frame(0) is None  # pruned with the snapshot window


def test_versions_merged_into_a_later_one_keep_their_rows_and_no_state(tmp_path: Path) -> None:
    """A batch's versions go out as one delta: the ones before its last have ledger rows and an
    empty sha256, the delta applies to the last version with a state, and the window of kept
    files and deltas counts versions with a state of their own."""
    store = Store(tmp_path, create=True)
    store.commit_version(0, {"w": np.zeros(2, np.float32)}, None, keep=2)
    with store.batch():
        store.merged_version(1, "u1")
        store.merged_version(2, "u2")
        store.commit_version(3, {"w": np.full(2, 3, np.float32)}, None, keep=2, delta_frame=b"frame3")
    assert store.delta_frame(3) == (0, b"frame3") and store.current_version() == 3
    with pytest.raises(StoreError, match="version 2 is not stored"):
        store.load_version(2)
    store.merged_version(4, "u4")
    store.commit_version(5, {"w": np.full(2, 5, np.float32)}, None, keep=2, delta_frame=b"frame5")
    assert store.delta_frame(5) == (3, b"frame5") and store.delta_frame(3) == (0, b"frame3")  # two with a state kept
    assert sorted(p.name for p in store.versions_dir.glob("v*")) == ["v00000003.safetensors", "v00000005.safetensors"]
    store.commit_version(6, {"w": np.full(2, 6, np.float32)}, None, keep=2, delta_frame=b"frame6")
    assert store.delta_frame(3) is None and store.delta_frame(5) == (3, b"frame5")
    assert sorted(p.name for p in store.versions_dir.glob("v*")) == ["v00000005.safetensors", "v00000006.safetensors"]


def test_a_batch_that_never_commits_leaves_the_last_committed_version_loadable(tmp_path: Path) -> None:
    """Pruning waits for the commit: uncommitted later versions must not delete the committed one."""
    store = Store(tmp_path, create=True)
    store.commit_version(0, {"w": np.zeros(2, np.float32)}, None, keep=2)
    with pytest.raises(RuntimeError), store.batch():
        for v in range(1, 6):
            store.commit_version(v, {"w": np.full(2, v, np.float32)}, None, keep=2)
        raise RuntimeError("kill -9 before the commit")
    store.close()
    again = Store(tmp_path, create=True)
    assert again.current_version() == 0
    state, _ = again.load_version(0)
    assert state["w"].tolist() == [0.0, 0.0]
    # A batch that commits prunes afterwards, keeping the window.
    with again.batch():
        for v in range(1, 6):
            again.commit_version(v, {"w": np.full(2, v, np.float32)}, None, keep=2)
    assert sorted(p.name for p in (tmp_path / "versions").glob("v*.safetensors")) == ["v00000004.safetensors", "v00000005.safetensors"]
