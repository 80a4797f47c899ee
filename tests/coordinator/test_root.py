"""The root's intake of partials, pure parts: group means against the fleet's tensors, and the
cross-partial check of covered update ids at any size."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from compression import FrameKind, compress_dense
from compression.partial import Group, Partial, PartialError
from coordinator.root import _covered_before, group_means
from coordinator.schema import create_or_migrate

SHAPES = {"a": (2, 3), "b": (4,)}


def _frame(scale: float, shapes: dict[str, tuple[int, ...]] = SHAPES) -> bytes:
    return compress_dense({k: np.full(s, scale, np.float32) for k, s in shapes.items()}, FrameKind.UPDATE)


def test_a_groups_mean_is_its_weighted_sum_over_its_weight() -> None:
    p = Partial("s", 1, 0.0, (Group(0, 4.0, 2, ("u1", "u2"), _frame(2.0)), Group(1, 10.0, 1, ("u3",), _frame(5.0))))
    means = group_means(p, SHAPES, 1 << 20)
    assert np.allclose(means[0]["a"], 0.5) and np.allclose(means[1]["b"], 0.5)


def test_a_group_of_other_tensors_or_not_finite_is_refused() -> None:
    with pytest.raises(PartialError, match="not the fleet's trainable tensors"):
        group_means(Partial("s", 1, 0.0, (Group(0, 1.0, 1, ("u",), _frame(1.0, {"a": (2, 3)})),)), SHAPES, 1 << 20)
    with pytest.raises(PartialError, match="not finite"):
        group_means(Partial("s", 1, 0.0, (Group(0, 1e-10, 1, ("u",), _frame(3e38)),)), SHAPES, 1 << 20)  # overflows float32
    with pytest.raises(PartialError, match="group 0"):
        group_means(Partial("s", 1, 0.0, (Group(0, 1.0, 1, ("u",), b"not a frame"),)), SHAPES, 1 << 20)


def test_covered_ids_are_checked_across_partials_beyond_sqlites_variable_limit() -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    create_or_migrate(db)
    ids = [f"d{i}" for i in range(40_000)]  # more than SQLite binds in one statement
    db.executemany("INSERT INTO partial_updates(update_id, partial_id) VALUES (?, 'p1')", [(u,) for u in ids[:-1]])
    assert _covered_before(db, ["new-1", "new-2"]) is None
    assert _covered_before(db, [f"x{i}" for i in range(39_000)] + ["d38998"]) == "d38998"
