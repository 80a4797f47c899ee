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
