"""FedAsync staleness weights and application, against hand-computed values."""

import numpy as np
import pytest

from coordinator.strategy import FedAsyncConfig, fedasync_step, staleness_weight


@pytest.mark.parametrize("tau, expected", [(0, 1.0), (1, 2**-0.5), (3, 0.5), (8, 1 / 3)])
def test_polynomial_weight_is_one_plus_tau_to_the_minus_a(tau: int, expected: float) -> None:
    assert staleness_weight(tau, FedAsyncConfig(staleness="polynomial", a=0.5)) == pytest.approx(expected)


def test_constant_and_hinge_weights() -> None:
    assert staleness_weight(50, FedAsyncConfig(staleness="constant")) == 1.0
    hinge = FedAsyncConfig(staleness="hinge", a=0.5, b=4)
    assert staleness_weight(4, hinge) == 1.0
    assert staleness_weight(6, hinge) == pytest.approx(1 / (0.5 * 2 + 1))


def test_negative_staleness_is_an_error() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        staleness_weight(-1, FedAsyncConfig())


def test_fedasync_step_scales_only_the_carried_tensors() -> None:
    delta = {"a": np.array([2.0, -2.0], np.float32)}
    step = fedasync_step(delta, 0.25)
    assert set(step) == {"a"} and step["a"].dtype == np.float32
    np.testing.assert_allclose(step["a"], [0.5, -0.5])
    np.testing.assert_array_equal(delta["a"], [2.0, -2.0])  # the input is not modified


def test_config_names_bad_values() -> None:
    with pytest.raises(ValueError, match="alpha"):
        FedAsyncConfig(alpha=0.0)
