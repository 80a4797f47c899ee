"""The coordinator half of in-process runs (:class:`fedge_lab.virtual.SimCoordinator`): pure logic,
driven with hand-made uploads."""

from __future__ import annotations

import numpy as np
import pytest

from compression import CodecConfig
from coordinator.strategy import StrategyConfig, staleness_weight
from fedge_lab.virtual import SimCoordinator, Upload

V0 = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}


def _up(device: str, base: int, value: float, samples: int = 8) -> Upload:
    delta = {n: np.full(v.shape, value, np.float32) for n, v in V0.items()}
    return Upload(device, base, samples, delta, 40, 40)


def test_fedasync_in_lock_step_weights_each_update_by_its_staleness() -> None:
    cfg = StrategyConfig(kind="fedasync", alpha=0.5)
    coord = SimCoordinator(cfg, V0, None)
    made = [m for i in range(3) for m in coord.submit(_up(f"d{i}", 0, 1.0), 0.0)]
    assert [m.version for m in made] == [1, 2, 3]
    assert [m.mean_staleness for m in made] == [0.0, 1.0, 2.0]
    weights = [0.5 * staleness_weight(t, cfg) for t in range(3)]
    assert [m.weights for m in made] == [(w,) for w in weights]
    np.testing.assert_allclose(coord.state["a"], np.full((2, 3), sum(weights)), rtol=1e-6)
    assert made[-1].bytes_down == 40  # uncompressed downlink: dense fp32 bytes
    assert V0["a"].sum() == 0  # version 0 was copied, never moved in place


def test_fedavg_rounds_refuse_a_second_update_and_forget_states_too_stale_to_train_on() -> None:
    cfg = StrategyConfig(kind="fedavg", round_participants=2, min_participants=2, round_late=1)
    coord = SimCoordinator(cfg, V0, CodecConfig())
    assert coord.submit(_up("d0", 0, 0.1), 0.0) == []
    assert coord.submit(_up("d0", 0, 0.1), 0.0) == []
    assert coord.rejected == {"one_per_round": 1}
    (v1,) = coord.submit(_up("d1", 0, 0.3), 0.0)
    assert v1.version == 1 and v1.updates == 2 and v1.bytes_down > 0
    for r in (2, 3):
        coord.submit(_up("d0", r - 1, 0.1), float(r))
        coord.submit(_up("d1", r - 1, 0.1), float(r))
    assert coord.version == 3 and coord.base_state(1) is None and coord.base_state(2) is not None
    assert coord.submit(_up("d0", 1, 0.1), 4.0) == []
    assert coord.rejected["too_stale"] == 1


def test_a_step_that_is_not_finite_makes_no_version() -> None:
    coord = SimCoordinator(StrategyConfig(kind="fedasync"), V0, None)
    assert coord.submit(_up("d0", 0, np.inf), 0.0) == []
    assert coord.version == 0 and coord.rejected == {"non_finite": 1}
    (m,) = coord.submit(_up("d1", 0, 0.5), 0.0)
    assert m.version == 1 and np.isfinite(coord.state["b"]).all()


def test_rebase_replaces_the_current_state_and_the_downlink_residual() -> None:
    coord = SimCoordinator(StrategyConfig(kind="fedasync"), V0, CodecConfig(topk_fraction=0.2))
    coord.submit(_up("d0", 0, 0.25), 0.0)
    assert coord.feedback.residual  # top-20% left most of the step in the residual
    fresh = {n: np.zeros_like(v) for n, v in V0.items()}
    coord.rebase(fresh)
    assert coord.state is fresh and not coord.feedback.residual
    assert coord.base_state(0) is None and coord.version == 1


@pytest.mark.parametrize("kind", ["fedbuff", "fedadam"])
def test_buffered_strategies_wait_for_the_buffer(kind: str) -> None:
    coord = SimCoordinator(StrategyConfig(kind=kind, buffer_size=3), V0, None)
    assert coord.submit(_up("d0", 0, 0.1), 0.0) == [] and coord.submit(_up("d1", 0, 0.1), 0.0) == []
    (m,) = coord.submit(_up("d2", 0, 0.1), 0.0)
    assert m.updates == 3 and len(m.weights) == 3 and coord.version == 1
