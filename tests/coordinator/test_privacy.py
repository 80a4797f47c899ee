"""Central DP: the accountant equals dp-accounting's own computation; DP-FedBuff clips, scales by K and adds noise."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.privacy import DPConfig, dp_mean, epsilon


@pytest.mark.parametrize("n, z", [(1, 1.0), (10, 1.0), (30, 2.0)])
def test_epsilon_matches_dp_accounting_for_the_same_events(n: int, z: float) -> None:
    pld = pld_privacy_accountant.PLDAccountant()
    rdp = rdp_privacy_accountant.RdpAccountant()
    for _ in range(n):  # the events one by one, as a device takes part in buffers
        pld.compose(dp_accounting.GaussianDpEvent(z))
        rdp.compose(dp_accounting.GaussianDpEvent(z))
    assert epsilon(n, z, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=1e-6)
    assert epsilon(n, z, 1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-6)
    # RDP is never tighter than PLD; both grow with participation.
    assert epsilon(n, z, 1e-5, "rdp") >= epsilon(n, z, 1e-5) * (1 - 1e-6)
    assert epsilon(n + 1, z, 1e-5) > epsilon(n, z, 1e-5)


def test_epsilon_edge_cases() -> None:
    assert epsilon(0, 1.0, 1e-5) == 0.0
    assert math.isinf(epsilon(3, 0.0, 1e-5))


def test_dp_mean_clips_after_staleness_weighting_and_divides_by_k() -> None:
    shapes = {"w": (2,), "t": (1,)}
    cfg = DPConfig(enabled=True, clip=1.0, noise_multiplier=0.0)
    big = {"w": np.array([30.0, 40.0], np.float32)}  # norm 50, staleness weight 0.5 -> 25 -> clipped to 1
    small = {"w": np.array([0.3, 0.4], np.float32)}  # norm 0.5, kept
    mean = dp_mean([big, small], shapes, [0.5, 1.0], cfg, buffer_size=4, rng=np.random.default_rng(0))
    np.testing.assert_allclose(mean["w"], (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 4, rtol=1e-6)
    np.testing.assert_array_equal(mean["t"], [0.0])


def test_dp_mean_noise_has_the_promised_scale_on_every_tensor() -> None:
    shapes = {"w": (20000,), "untouched": (20000,)}
    cfg = DPConfig(enabled=True, clip=2.0, noise_multiplier=1.5)
    mean = dp_mean([{"w": np.zeros(20000, np.float32)}], shapes, [1.0], cfg, buffer_size=10, rng=np.random.default_rng(1))
    for name in shapes:  # sigma = z C / K = 0.3, also on the tensor no update carried
        assert np.std(mean[name]) == pytest.approx(0.3, rel=0.03)


def test_dp_config_names_bad_values() -> None:
    with pytest.raises(ValueError, match="delta"):
        DPConfig(delta=0.0)
    with pytest.raises(ValueError, match="enforce"):
        DPConfig(enforce="never")  # type: ignore[arg-type]
