"""Training schedule windows and reconnect backoff."""

import datetime as dt
import math
import random

import pytest

from edge_agent.backoff import Backoff
from edge_agent.config import ScheduleConfig
from edge_agent.errors import ConfigError
from edge_agent.schedule import blocked_reason, in_window


@pytest.mark.parametrize(
    "window, hhmm, inside",
    [
        ("00:00-24:00", "13:37", True),
        ("09:00-17:00", "08:59", False),
        ("09:00-17:00", "09:00", True),
        ("09:00-17:00", "17:00", False),
        ("22:00-06:00", "23:30", True),
        ("22:00-06:00", "05:59", True),
        ("22:00-06:00", "12:00", False),
    ],
)
def test_training_windows_may_wrap_midnight(window: str, hhmm: str, inside: bool) -> None:
    h, m = map(int, hhmm.split(":"))
    assert in_window(window, dt.datetime(2026, 1, 1, h, m)) is inside


@pytest.mark.parametrize("window", ["9-17", "25:00-01:00", "10:00-10:00", "10:60-11:00", "", "a:b-c:d"])
def test_bad_windows_name_the_key(window: str) -> None:
    with pytest.raises(ConfigError, match="schedule.window"):
        ScheduleConfig(window=window)


def test_blocked_reason_says_why() -> None:
    assert blocked_reason(ScheduleConfig()) is None
    reason = blocked_reason(ScheduleConfig(window="01:00-02:00"), dt.datetime(2026, 1, 1, 12, 0))
    assert reason is not None and "01:00-02:00" in reason
    reason = blocked_reason(ScheduleConfig(min_free_memory_mb=10**9))
    assert reason is not None and "min_free_memory_mb" in reason


def test_own_load_follows_the_cpu_this_process_keeps_busy_as_the_load_average_would() -> None:
    import os
    import time

    from edge_agent.schedule import OwnLoad

    t0 = time.monotonic()
    own = OwnLoad(t0)
    end = time.process_time() + 0.6
    while time.process_time() < end:  # one thread busy for 0.6 s of CPU
        pass
    value = own.sample(time.monotonic())
    elapsed = time.monotonic() - t0
    # busy ~ 0.6 CPU-s / elapsed, averaged with a 60 s time constant from 0
    expect = 0.6 / elapsed * (1 - math.exp(-elapsed / OwnLoad.TAU_S))
    assert 0.5 * expect <= value <= 1.5 * expect
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    # Only the load of other processes counts: all of it taken out, nothing blocks.
    assert blocked_reason(ScheduleConfig(max_load_per_cpu=0.001), own_load=os.getloadavg()[0] + 1) is None
    if load > 0.01:
        reason = blocked_reason(ScheduleConfig(max_load_per_cpu=0.001), own_load=0.0)
        assert reason is not None and "from other processes" in reason


def test_backoff_grows_exponentially_with_jitter_and_resets() -> None:
    b = Backoff(1.0, 60.0, random.Random(0))
    delays = [b.next() for _ in range(10)]
    for n, d in enumerate(delays):
        cap = min(60.0, 2.0**n)
        assert max(1.0, cap / 2) <= d <= cap
    assert max(delays) <= 60.0 and delays[-1] >= 30.0
    b.reset()
    assert b.next() == 1.0


def test_jitter_spreads_a_fleet() -> None:
    fleet = [Backoff(1.0, 60.0, random.Random(i)) for i in range(50)]
    for b in fleet:
        for _ in range(5):
            b.next()
    sixth = [b.next() for b in fleet]
    assert max(sixth) - min(sixth) > 10.0  # not in lockstep


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
