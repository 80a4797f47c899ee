"""Robust aggregation rules, against hand-computed values, and their effect on a poisoned buffer."""

import numpy as np
import pytest

from coordinator.robust import RobustConfig, coordinate_median, krum_scores, multi_krum_select, trimmed_mean
from coordinator.strategy import StrategyConfig, WeightedUpdate, buffered_step, krum_keep


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    rows = np.array([[1, 10], [2, -50], [100, 20], [3, 30], [4, 40]], np.float32)
    # beta 0.2 of 5 rows: one from each end. Column 0 keeps 2,3,4; column 1 keeps 10,20,30.
    np.testing.assert_allclose(trimmed_mean(rows, 0.2), [3.0, 20.0])
    np.testing.assert_allclose(trimmed_mean(rows, 0.0), rows.mean(axis=0))
    with pytest.raises(ValueError):
        RobustConfig(rule="trimmed_mean", trim=0.5)


def test_coordinate_median() -> None:
    rows = np.array([[1, 5], [2, 6], [100, -7]], np.float32)
    np.testing.assert_allclose(coordinate_median(rows), [2.0, 5.0])


def test_krum_scores_by_hand_and_the_outlier_is_dropped() -> None:
    rows = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    # n=4, f=1: each row sums its n-f-2 = 1 nearest squared distance: 1, 1, 1, 64.
    np.testing.assert_allclose(krum_scores(rows, 1), [1.0, 1.0, 1.0, 64.0])
    assert sorted(multi_krum_select(rows, 1).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="n > f"):
        krum_scores(rows[:3], 1)


def _u(value: list[float], n: int = 1) -> WeightedUpdate:
    return WeightedUpdate({"w": np.array(value, np.float32)}, n, 0)


def _buffer() -> list[WeightedUpdate]:
    rng = np.random.default_rng(0)
    honest = [_u(list(1.0 + 0.1 * rng.normal(size=4))) for _ in range(8)]
    poisoned = [_u([-20.0] * 4), _u([-20.0] * 4)]  # 20% sign-flipped x20
    return honest + poisoned


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "multi_krum", "norm_bound"])
def test_each_defence_keeps_a_poisoned_buffer_near_the_honest_mean(rule: str) -> None:
    robust = RobustConfig(rule=rule, trim=0.2, krum_f=2, clip=2.5)  # type: ignore[arg-type]
    cfg = StrategyConfig(kind="fedbuff", staleness="constant", weight_by_samples=False, robust=robust)
    plain = buffered_step(_buffer(), StrategyConfig(kind="fedbuff", staleness="constant", weight_by_samples=False))
    defended = buffered_step(_buffer(), cfg)
    assert np.all(plain["w"] < -2.0)  # the plain mean is dragged far off
    if rule == "norm_bound":
        # Clipping bounds each device's pull: the attackers' -20s become -1.25 each.
        assert np.all(defended["w"] > 0.5)
    else:
        np.testing.assert_allclose(defended["w"], 1.0, atol=0.2)


def test_multi_krum_compares_updates_of_the_same_tier_only() -> None:
    lora = [WeightedUpdate({"a": np.array([float(i)], np.float32)}, 1, 0) for i in range(5)]
    emb = [WeightedUpdate({"t": np.array([1.0], np.float32)}, 1, 0) for _ in range(2)]
    keep = krum_keep(lora + emb, f=1)
    assert {5, 6} <= set(keep)  # a group too small to judge is kept
    assert 4 not in keep or 0 not in keep  # an extreme LoRA update is dropped
