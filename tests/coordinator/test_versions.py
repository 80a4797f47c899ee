"""A batch's versions committed as one: each keeps its number and ledger rows, one delta goes out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compression import ErrorFeedback, apply_delta, decode_frame, state_digest
from coordinator.config import CoordinatorConfig
from coordinator.engine import Step
from coordinator.errors import Rejection
from coordinator.store import LedgerEntry, Store
from coordinator.versions import Versions


def _entry(uid: str) -> LedgerEntry:
    return LedgerEntry(uid, "dev", 1, 0, 0, 1.0, 4, 100, None)


def _versions(tmp_path: Path) -> Versions:
    store = Store(tmp_path, create=True)
    state = {"w": np.zeros((4, 8), np.float32)}
    store.commit_version(0, state, None, keep=20)
    return Versions(CoordinatorConfig(state_dir=str(tmp_path), fleet="t"), store, state, ErrorFeedback(), 0)


def _step(version: int, value: float) -> Step:
    return Step(version=version, step={"w": np.full((4, 8), value, np.float32)}, weights=(1.0,), state={"m": np.full(2, value, np.float32)})


def test_a_merging_batch_writes_one_state_and_publishes_one_delta_from_the_last_published(tmp_path: Path) -> None:
    v = _versions(tmp_path)
    with v.store.batch(), v.merging():
        for k in (1, 2, 3):
            assert v.commit(_step(k, 0.1 * k), [_entry(f"u{k}")]) is None  # held
        assert v.state["w"].max() == 0.0 and not v.pending
    (pub,) = v.take_pending()
    assert (pub.version, pub.base, v.version) == (3, 0, 3)
    # What devices at v0 apply is exactly the coordinator's state at v3.
    held = apply_delta({"w": np.zeros((4, 8), np.float32)}, decode_frame(pub.delta_frame).dense())
    assert state_digest(held) == state_digest(v.state) == state_digest(pub.state)
    rows = {r["version"]: r["sha256"] for r in v.store.db.execute("SELECT version, sha256 FROM versions")}
    assert rows[1] == rows[2] == "" and rows[3] != ""
    assert [e["applied_version"] for e in v.store.ledger()] == [1, 2, 3]
    assert v.store.delta_frame(3) == (0, pub.delta_frame)
    state, _, strategy = v.store.load_version_full(3)
    np.testing.assert_array_equal(strategy["m"], np.full(2, 0.3, np.float32))  # the last step's strategy state
    # The next batch's delta applies to v3.
    with v.store.batch(), v.merging():
        v.commit(_step(4, 0.5), [_entry("u4")])
    (pub,) = v.take_pending()
    assert (pub.version, pub.base) == (4, 3)


def test_steps_that_overflow_together_are_refused_at_the_end_and_nothing_is_written(tmp_path: Path) -> None:
    v = _versions(tmp_path)
    mark = v.mark()
    with pytest.raises(Rejection, match="not finite"), v.store.batch(), v.merging():
        v.commit(_step(1, 3e38), [_entry("u1")])
        v.commit(_step(2, 3e38), [_entry("u2")])  # finite alone, infinite together
    v.restore(mark)
    assert v.store.current_version() == 0 and not list(v.store.ledger()) and not v.held and v.version == 0


def test_without_merging_each_version_is_written_and_published(tmp_path: Path) -> None:
    v = _versions(tmp_path)
    with v.store.batch(), v.merging(False):
        assert v.commit(_step(1, 0.1), [_entry("u1")])
        assert v.commit(_step(2, 0.1), [_entry("u2")])
    assert [(p.version, p.base) for p in v.take_pending()] == [(1, 0), (2, 1)]
