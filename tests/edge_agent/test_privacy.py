"""Local DP on the device: clipping, noise scale, and the device's own accounting."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from edge_agent.errors import ConfigError
from edge_agent.privacy import LocalDPConfig, local_epsilon, privatize
from edge_agent.state import AgentState


def test_gaussian_clips_to_l2_and_adds_the_promised_noise() -> None:
    delta = {"a": np.full(40000, 10.0, np.float32)}  # L2 norm 2000
    cfg = LocalDPConfig(mechanism="gaussian", clip=1.0, noise_multiplier=0.5)
    out = privatize(delta, cfg, np.random.default_rng(0))
    assert abs(float(out["a"].mean()) - 1.0 / 200) < 0.01  # clipped to norm 1: each entry 1/200
    assert float(out["a"].std()) == pytest.approx(0.5, rel=0.02)


def test_laplace_clips_to_l1() -> None:
    delta = {"a": np.array([3.0, -4.0], np.float32), "b": np.array([3.0], np.float32)}  # L1 10
    cfg = LocalDPConfig(mechanism="laplace", clip=1.0, epsilon_per_round=1e9)  # negligible noise
    out = privatize(delta, cfg, np.random.default_rng(0))
    np.testing.assert_allclose(out["a"], [0.3, -0.4], atol=1e-6)
    np.testing.assert_allclose(out["b"], [0.3], atol=1e-6)


def test_local_epsilon_is_dp_accountings_own() -> None:
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(2.0), 12)
    assert local_epsilon(12, "gaussian", 2.0, 1.0, 1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert local_epsilon(0, "gaussian", 2.0, 1.0, 1e-5) == 0.0
    # Laplace: never more than basic composition.
    assert 0 < local_epsilon(5, "laplace", 1.0, 0.5, 1e-5) <= 2.5


def test_noised_rounds_are_counted_durably(tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = AgentState(tmp_path)
    st.next_seq(dp_round=True)
    st.next_seq(dp_round=False)
    st.next_seq(dp_round=True)
    assert AgentState(tmp_path).dp_rounds == 2


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        LocalDPConfig(mechanism="fancy")  # type: ignore[arg-type]
