"""Amplification by cohort sampling: ε from the recorded cohorts, against dp-accounting's own accountants."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.privacy import amplified_epsilon, calibrate_noise, epsilon

COHORTS = [(1000, 100)] * 20 + [(800, 100)] * 5 + [(1200, 50)] * 3


def test_the_claim_equals_dp_accountings_rdp_accountant_for_sampling_without_replacement() -> None:
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    g = dp_accounting.GaussianDpEvent(1.2)
    for eligible, size in COHORTS:  # one event per cohort, in the order they happened
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(eligible, size, g))
    assert amplified_epsilon(COHORTS, 1.2, 1e-4) == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)


def test_the_poisson_cross_check_equals_dp_accountings_pld_accountant() -> None:
    acc = pld_privacy_accountant.PLDAccountant()
    g = dp_accounting.GaussianDpEvent(1.2)
    for eligible, size in COHORTS:
        acc.compose(dp_accounting.PoissonSampledDpEvent(size / eligible, g))
    assert amplified_epsilon(COHORTS, 1.2, 1e-4, "pld_poisson") == pytest.approx(acc.get_epsilon(1e-4), rel=1e-6)
    # PLD is tighter than RDP on the same Poisson events, and both are below no amplification at all.
    assert amplified_epsilon(COHORTS, 1.2, 1e-4, "pld_poisson") <= amplified_epsilon(COHORTS, 1.2, 1e-4, "rdp_poisson")
    assert amplified_epsilon(COHORTS, 1.2, 1e-4, "rdp_poisson") < epsilon(len(COHORTS), 1.2, 1e-4, "rdp")


def test_a_smaller_pool_or_more_cohorts_never_gives_less_epsilon() -> None:
    base = amplified_epsilon([(1000, 100)] * 10, 1.0, 1e-4)
    assert amplified_epsilon([(900, 100)] * 10, 1.0, 1e-4) > base
    assert amplified_epsilon([(1000, 100)] * 11, 1.0, 1e-4) > base
    assert amplified_epsilon([(1000, 100)] * 10, 1.1, 1e-4) < base
    assert amplified_epsilon([], 1.0, 1e-4) == 0.0 and amplified_epsilon([(10, 1)], 0.0, 1e-4) == float("inf")
    with pytest.raises(ValueError, match="not a sample"):
        amplified_epsilon([(10, 11)], 1.0, 1e-4)


def test_the_noise_is_calibrated_to_the_target() -> None:
    cohorts = [(1000, 100)] * 30
    z = calibrate_noise(cohorts, 4.0, 1e-4)
    assert amplified_epsilon(cohorts, z, 1e-4) <= 4.0 < amplified_epsilon(cohorts, z / 1.01, 1e-4)


def test_the_coordinators_epsilon_comes_from_its_recorded_cohorts_and_the_budget_stops_them() -> None:
    import sqlite3

    from coordinator.cohort_privacy import recorded_sampling, sampling_pool
    from coordinator.cohorts import CohortConfig, Cohorts
    from coordinator.engine import Engine
    from coordinator.privacy import DPConfig
    from coordinator.schema import create_or_migrate
    from coordinator.strategy import StrategyConfig

    db = sqlite3.connect(":memory:", isolation_level=None)
    create_or_migrate(db)
    dp = DPConfig(enabled=True, clip=1.0, noise_multiplier=0.8, delta=1e-4, epsilon_budget=3.0)
    cohorts = Cohorts(CohortConfig(enabled=True, concurrency=10, size=10, deadline_s=5.0, fill_wait_s=0.0), db, 10, dp=dp)
    devices = [f"d{i:03d}" for i in range(137)]
    opened = 0
    for t in range(200):  # each cohort expires before the next turn, so its members are eligible again
        opened += len(cohorts.open_next(10.0 * t, devices, 0))
        if cohorts.budget.spent:
            break
    assert cohorts.budget.spent and cohorts.status()["cohorts_stopped"] == "privacy budget spent"
    assert recorded_sampling(db) == cohorts.budget.sampled and len(cohorts.budget.sampled) == opened
    eligible = {e for e, _ in cohorts.budget.sampled}
    assert eligible <= {130, 137 - 10} | {120} and all(s == 10 for _, s in cohorts.budget.sampled)  # 137 rounds down to 130
    spent = amplified_epsilon(cohorts.budget.sampled, 0.8, 1e-4)
    assert cohorts.budget.epsilon() == spent <= 3.0 < amplified_epsilon(cohorts.budget.sampled + [(130, 10)], 0.8, 1e-4)
    engine = Engine(StrategyConfig(kind="fedbuff", buffer_size=10), shapes={"a": (4,)}, dp=dp, amplified=cohorts.budget.epsilon)
    assert engine.fleet_epsilon() == spent == engine.device_epsilon("d001", extra=1)
    assert sampling_pool(987, 100) == (980, 100) and sampling_pool(105, 104) == (104, 104) and sampling_pool(42, 5) == (42, 5)
    assert sampling_pool(12345, 10) == (12000, 10)


def test_dp_with_cohorts_needs_each_cohort_to_be_one_buffer() -> None:
    from coordinator.cohorts import CohortConfig
    from coordinator.config import CoordinatorConfig
    from coordinator.errors import ConfigError
    from coordinator.privacy import DPConfig
    from coordinator.strategy import StrategyConfig

    dp, fedbuff = DPConfig(enabled=True), StrategyConfig(kind="fedbuff", buffer_size=10)
    CoordinatorConfig(state_dir="s", strategy=fedbuff, dp=dp, cohorts=CohortConfig(enabled=True, concurrency=20))
    CoordinatorConfig(state_dir="s", strategy=fedbuff, dp=dp, cohorts=CohortConfig(enabled=True, concurrency=20, size=10))
    with pytest.raises(ConfigError, match="cohorts.size = strategy.buffer_size"):
        CoordinatorConfig(state_dir="s", strategy=fedbuff, dp=dp, cohorts=CohortConfig(enabled=True, concurrency=20, size=5))


def test_devices_and_status_show_the_amplified_epsilon_from_the_recorded_cohorts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from coordinator.cli.devices import device_rows
    from coordinator.cli.status import collect
    from coordinator.cohort_privacy import recorded_sampling
    from coordinator.store import Store

    store = Store(tmp_path, create=True)
    store.set_meta("dp", json.dumps({"noise_multiplier": 1.0, "delta": 1e-5, "amplified": True}))
    members = [f"d{i}" for i in range(10)]
    for n in range(1, 6):
        store.db.execute(
            "INSERT INTO cohorts (cohort, number, version, created, deadline, eligible, seed, members) VALUES (?,?,0,0,1,?,0,?)",
            (f"c{n:08d}", n, 987, json.dumps(members)),
        )
    for d in ("d1", "d2"):
        store.db.execute("INSERT INTO devices(device, state, last_seen) VALUES (?, 'idle', 0)", (d,))
    store.close()
    want = amplified_epsilon([(980, 10)] * 5, 1.0, 1e-5)  # 987 eligible, rounded down
    assert recorded_sampling(Store(tmp_path, readonly=True).db) == [(980, 10)] * 5
    rows = device_rows(tmp_path)
    assert [r["dp_epsilon"] for r in rows] == [want, want]  # the same bound for every device, participations or not
    assert collect(str(tmp_path))["dp"]["epsilon_max"] == want
