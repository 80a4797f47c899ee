"""Bounded influence: the norm bound and the sample-count cap, as pure functions."""

from coordinator.influence import cap_samples, norm_bound


def test_the_adaptive_bound_follows_the_recent_median_after_warm_up() -> None:
    assert norm_bound("adaptive", fixed=0.0, factor=4.0, warmup=3, recent=[1.0, 2.0], global_norm=3.29) == 4 * 3.29
    assert norm_bound("adaptive", fixed=0.0, factor=4.0, warmup=3, recent=[1.0, 2.0, 3.0, 100.0], global_norm=3.29) == 4 * 2.5
    assert norm_bound("adaptive", fixed=5.0, factor=4.0, warmup=3, recent=[1.0, 2.0, 3.0], global_norm=3.29) == 5.0
    assert norm_bound("fixed", fixed=7.0, factor=4.0, warmup=3, recent=[], global_norm=1.0) == 7.0
    assert norm_bound("off", fixed=7.0, factor=4.0, warmup=3, recent=[], global_norm=1.0) == 0.0
    # A fleet whose global state is all zeros still has a bound.
    assert norm_bound("adaptive", fixed=0.0, factor=4.0, warmup=3, recent=[], global_norm=0.0) > 0


def test_a_sample_claim_is_capped_by_enrolment_the_hard_cap_and_the_fleet() -> None:
    assert cap_samples(10**12, enrolled_cap=None, hard_cap=100_000, factor=4.0, others=[]) == 100_000
    assert cap_samples(10**12, enrolled_cap=None, hard_cap=100_000, factor=4.0, others=[4]) == 16
    assert cap_samples(10**12, enrolled_cap=None, hard_cap=100_000, factor=4.0, others=[4, 10**5]) == 16  # the lower median
    assert cap_samples(50, enrolled_cap=20, hard_cap=100_000, factor=4.0, others=[]) == 20
    assert cap_samples(8, enrolled_cap=None, hard_cap=100_000, factor=4.0, others=[4, 4, 4]) == 8
