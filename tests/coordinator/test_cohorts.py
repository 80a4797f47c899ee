"""Cohorts, pure: the planner's sampling, concurrency bound and deadlines; the store's record of them."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.cohorts import CohortConfig, CohortPlanner, Cohorts, cohort_size
from coordinator.errors import Rejection
from coordinator.schema import create_or_migrate

DEVICES = [f"d{i:02d}" for i in range(20)]


def test_a_cohort_is_sampled_from_the_eligible_devices_seeded_and_reproducible() -> None:
    cfg = CohortConfig(enabled=True, concurrency=8, size=4, seed=7)
    a = CohortPlanner(cfg, 4).plan(10.0, DEVICES, version=3)
    b = CohortPlanner(cfg, 4).plan(10.0, reversed(DEVICES), version=3)
    assert a is not None and a == b  # the order devices come in does not matter
    assert a.cohort == "c00000001" and a.version == 3 and a.eligible == 20 and a.deadline == 10.0 + cfg.deadline_s
    expected = np.random.default_rng([7, 1]).choice(20, size=4, replace=False)
    assert a.members == tuple(sorted(DEVICES[i] for i in expected))
    other = CohortPlanner(CohortConfig(enabled=True, concurrency=8, size=4, seed=8), 4).plan(10.0, DEVICES, 3)
    assert other is not None and other.members != a.members


def test_no_more_than_concurrency_devices_are_ever_in_flight() -> None:
    p = CohortPlanner(CohortConfig(enabled=True, concurrency=6, size=4, deadline_s=5.0), 4)
    first = p.plan(0.0, DEVICES, 0)
    assert first is not None
    p.opened(first)
    assert p.plan(0.0, DEVICES, 0) is None  # 2 slots free, a cohort needs 4
    for d in first.members[:2]:
        p.reported(d)
    second = p.plan(1.0, DEVICES, 1)
    assert second is not None and not set(second.members) & set(p.in_flight)
    p.opened(second)
    assert len(p.in_flight) == 6 and p.number == 2


def test_a_member_past_its_deadline_is_a_dropout_and_frees_its_slot() -> None:
    p = CohortPlanner(CohortConfig(enabled=True, concurrency=2, size=2, deadline_s=5.0), 2)
    c = p.plan(0.0, DEVICES[:3], 0)
    assert c is not None
    p.opened(c)
    p.reported(c.members[0])
    assert p.expired(4.9) == []
    assert p.expired(5.0) == [(c.members[1], c.cohort)]
    assert p.in_flight == {}
    with pytest.raises(Rejection, match="no open invitation") as exc:
        p.check(c.members[1], c.cohort)
    assert exc.value.reason == "not_invited"


def test_an_update_must_name_the_cohort_of_its_devices_open_invitation() -> None:
    p = CohortPlanner(CohortConfig(enabled=True, concurrency=4, size=1), 1)
    c = p.plan(0.0, ["d00"], 0)
    assert c is not None
    p.opened(c)
    p.check("d00", c.cohort)
    with pytest.raises(Rejection, match="names cohort 'c00000009'"):
        p.check("d00", "c00000009")
    with pytest.raises(Rejection, match="names no cohort"):
        p.check("d00", "")
    with pytest.raises(Rejection, match="no open invitation"):
        p.check("d01", c.cohort)


def test_fewer_eligible_devices_than_a_cohort_make_a_smaller_one() -> None:
    p = CohortPlanner(CohortConfig(enabled=True, concurrency=10, size=5), 5)
    c = p.plan(0.0, DEVICES[:2], 0)
    assert c is not None and len(c.members) == 2
    assert CohortPlanner(CohortConfig(enabled=True), 10).plan(0.0, [], 0) is None


def test_the_cohort_size_follows_the_strategy_and_the_config_is_checked() -> None:
    assert cohort_size(CohortConfig(concurrency=20), "fedbuff", 10, 0) == 10
    assert cohort_size(CohortConfig(concurrency=5), "fedbuff", 10, 0) == 5
    assert cohort_size(CohortConfig(concurrency=20), "fedavg", 10, 8) == 8
    assert cohort_size(CohortConfig(concurrency=20, size=3), "fedavg", 10, 8) == 3
    with pytest.raises(ValueError, match="cohorts.size"):
        CohortConfig(concurrency=4, size=5)
    with pytest.raises(ValueError, match="cohorts.concurrency"):
        CohortConfig(concurrency=0)
    with pytest.raises(ValueError, match="cohorts.deadline_s"):
        CohortConfig(deadline_s=0.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["tick", "report", "expire"]), st.integers(0, 19)), max_size=60),
    st.integers(1, 8),
    st.integers(1, 8),
)
def test_any_sequence_of_events_keeps_the_bound(events: list[tuple[str, int]], concurrency: int, size: int) -> None:
    size = min(size, concurrency)
    p = CohortPlanner(CohortConfig(enabled=True, concurrency=concurrency, size=size, deadline_s=3.0), size)
    now = 0.0
    for kind, i in events:
        now += 1.0
        if kind == "tick" and (c := p.plan(now, DEVICES, 0)) is not None:
            assert not set(c.members) & set(p.in_flight) and len(c.members) <= size
            p.opened(c)
        elif kind == "report":
            p.reported(DEVICES[i])
        else:
            p.expired(now)
        assert len(p.in_flight) <= concurrency


def test_cohorts_are_recorded_and_come_back_after_a_restart(tmp_path: object) -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    create_or_migrate(db)
    cfg = CohortConfig(enabled=True, concurrency=4, size=2, deadline_s=5.0, seed=1)
    cohorts = Cohorts(cfg, db, 2)
    opened = cohorts.open_next(100.0, DEVICES[:6], version=2)
    assert [len(c.members) for c in opened] == [2, 2] and cohorts.in_flight == 4
    first = opened[0]
    cohorts.reported(first.members[0], first.cohort, 101.0)
    again = Cohorts(cfg, db, 2)  # a restart: the open invitations and the count come from the database
    assert again.planner.number == 2 and again.in_flight == 3
    assert [i.device for i in again.open_invitations()] == [first.members[1], *opened[1].members]
    assert all(i.version == 2 and i.deadline == 105.0 for i in again.open_invitations())
    again.open_next(105.0, [], version=2)  # past the deadline: three dropouts
    states = dict(db.execute("SELECT state, COUNT(*) FROM cohort_members GROUP BY state").fetchall())
    assert states == {"reported": 1, "dropped": 3}
    assert Cohorts(cfg, db, 2).dropouts == 3


def test_fedavg_in_cohorts_must_name_how_many_invited_devices_a_round_waits_for() -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.errors import ConfigError
    from coordinator.strategy import StrategyConfig

    cohorts = CohortConfig(enabled=True, concurrency=10)
    with pytest.raises(ConfigError, match="round_participants in 1..cohorts.concurrency"):
        CoordinatorConfig(state_dir="s", strategy=StrategyConfig(kind="fedavg"), cohorts=cohorts)
    with pytest.raises(ConfigError, match="got 11"):
        CoordinatorConfig(state_dir="s", strategy=StrategyConfig(kind="fedavg", round_participants=11), cohorts=cohorts)
    CoordinatorConfig(state_dir="s", strategy=StrategyConfig(kind="fedavg", round_participants=10), cohorts=cohorts)
    CoordinatorConfig(state_dir="s", strategy=StrategyConfig(kind="fedbuff", buffer_size=50), cohorts=cohorts)
