"""The aggregation engine with a fake clock and no broker: buffering, closing, rounds of devices,
the weights the ledger records, DP admission, server optimizers and user strategies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from coordinator.engine import Accepted, Engine, StrategyError
from coordinator.errors import Rejection
from coordinator.privacy import DPConfig
from coordinator.robust import RobustConfig
from coordinator.strategies import Aggregate, BaseStrategy, BufferView, FedAdam, StrategyLoadError, load_strategy
from coordinator.strategy import StrategyConfig, WeightedUpdate

SHAPES = {"w": (4,)}


def _acc(device: str, value: float | list[float], base: int = 0, n: int = 4, uid: str | None = None) -> Accepted:
    vals = np.full(4, value, np.float32) if isinstance(value, float) else np.array(value, np.float32)
    return Accepted(uid or f"{device}-{value}-{base}", device, base, n, {"w": vals})


def _engine(**strategy: object) -> Engine:
    return Engine(StrategyConfig(**strategy), shapes=SHAPES)  # type: ignore[arg-type]


def test_fedasync_makes_a_version_per_update_weighted_by_staleness() -> None:
    e = _engine(kind="fedasync", alpha=0.5, staleness="polynomial", a=1.0)
    step = e.offer(_acc("a", 2.0), now=0.0)
    assert step is not None and step.version == 1 and step.weights == (0.5,) and step.staleness == (0,)
    np.testing.assert_allclose(step.step["w"], 1.0)
    e.commit(step, now=0.0)
    late = e.offer(_acc("b", 2.0, base=0), now=1.0)  # tau = 1: alpha / 2
    assert late is not None and late.weights == (0.25,) and late.staleness == (1,)


def test_fedbuff_waits_for_k_and_a_step_is_only_final_after_commit() -> None:
    e = _engine(kind="fedbuff", buffer_size=3, staleness="constant")
    assert e.offer(_acc("a", 1.0), 0.0) is None
    assert e.offer(_acc("b", 2.0), 0.0) is None
    step = e.offer(_acc("a", 3.0), 0.0)
    assert step is not None and len(step.updates) == 3
    np.testing.assert_allclose(step.step["w"], 2.0)
    assert step.weights == pytest.approx((1 / 3,) * 3)
    assert e.version == 0 and len(e.buffer) == 3  # nothing moves until the shell committed
    e.commit(step, 0.0)
    assert e.version == 1 and e.buffer == []


def test_multi_krum_records_weight_zero_for_the_update_it_drops() -> None:
    e = _engine(kind="fedbuff", buffer_size=5, staleness="constant", robust=RobustConfig(rule="multi_krum", krum_f=1))
    rng = np.random.default_rng(0)
    step = None
    for i in range(4):
        step = e.offer(_acc(f"h{i}", list(1.0 + 0.01 * rng.normal(size=4))), 0.0)
    step = e.offer(_acc("evil", -50.0), 0.0)
    assert step is not None
    weights = {u.device: w for u, w in zip(step.updates, step.weights, strict=True)}
    assert weights["evil"] == 0.0
    assert all(w == pytest.approx(1 / 4) for d, w in weights.items() if d != "evil")
    assert np.all(step.step["w"] > 0.9)


def test_norm_bound_records_the_scaled_weight() -> None:
    e = _engine(kind="fedbuff", buffer_size=2, staleness="constant", robust=RobustConfig(rule="norm_bound", clip=1.0))
    e.offer(_acc("a", 0.1), 0.0)  # norm 0.2: kept whole
    step = e.offer(_acc("b", 2.0), 0.0)  # norm 4: scaled by 1/4
    assert step is not None and step.weights == pytest.approx((0.5, 0.125))


def test_a_fedavg_round_holds_one_update_per_device_and_waits_for_its_devices() -> None:
    e = _engine(kind="fedavg", min_participants=2, round_deadline_s=60.0)
    e.online_at_start = 3  # three devices were online when the round began
    e.admit("fast")
    assert e.offer(_acc("fast", 1.0), now=1.0, online=3) is None
    with pytest.raises(Rejection) as rej:
        e.admit("fast")  # its second update of the round
    assert rej.value.reason == "one_per_round" and "round 1" in rej.value.detail
    assert e.offer(_acc("mid", 1.0), now=2.0, online=3) is None
    assert e.poll(now=30.0, online=3) is None  # two of three, before the deadline: the round waits
    step = e.offer(_acc("slow", 4.0), now=40.0, online=3)
    assert step is not None and sorted(u.device for u in step.updates) == ["fast", "mid", "slow"]
    np.testing.assert_allclose(step.step["w"], 2.0)


def test_a_fedavg_round_closes_at_the_deadline_with_the_minimum() -> None:
    e = _engine(kind="fedavg", min_participants=2, round_deadline_s=10.0)
    e.online_at_start = 5
    e.offer(_acc("a", 1.0), 1.0)
    assert e.poll(now=11.0) is None  # one device: below the minimum, it waits past the deadline
    e.offer(_acc("b", 1.0), 12.0)
    e.started = 0.0
    step = e.poll(now=12.5)
    assert step is not None and len(step.updates) == 2


def test_dp_admits_one_update_per_buffer_and_records_clipped_weights() -> None:
    dp = DPConfig(enabled=True, clip=1.0, noise_multiplier=0.0, seed=0)
    e = Engine(StrategyConfig(kind="fedbuff", buffer_size=2, staleness="constant"), shapes=SHAPES, dp=dp)
    e.admit("a")
    e.offer(_acc("a", 0.1), 0.0)  # norm 0.2: not clipped
    with pytest.raises(Rejection) as rej:
        e.admit("a")
    assert rej.value.reason == "one_per_buffer"
    step = e.offer(_acc("b", 2.0), 0.0)  # norm 4: clipped to 1
    assert step is not None and step.participants == ("a", "b")
    assert step.weights == pytest.approx((0.5, 0.125))
    np.testing.assert_allclose(step.step["w"], 0.5 * 0.1 + 0.125 * 2.0, rtol=1e-6)
    e.commit(step, 0.0)
    assert e.participations == {"a": 1, "b": 1}


def test_mark_and_restore_undo_an_offer() -> None:
    e = _engine(kind="fedbuff", buffer_size=2)
    e.offer(_acc("a", 1.0), 0.0)
    mark = e.mark()
    step = e.offer(_acc("b", 1.0), 0.0)
    assert step is not None
    e.commit(step, 5.0)
    e.restore(mark)
    assert e.version == 0 and [u.device for u in e.buffer] == ["a"]


def test_a_failed_step_drops_its_updates() -> None:
    e = _engine(kind="fedbuff", buffer_size=2)
    e.offer(_acc("a", 1.0), 0.0)
    step = e.offer(_acc("b", 1.0), 0.0)
    assert step is not None
    e.drop(step)
    assert e.buffer == [] and e.version == 0


def test_fedadam_steps_by_lr_per_coordinate_and_carries_its_moments() -> None:
    cfg = StrategyConfig(kind="fedadam", buffer_size=1, staleness="constant")
    e = Engine(cfg, shapes=SHAPES)
    step = e.offer(_acc("a", [0.5, -0.5, 0.0, 2.0]), 0.0)
    assert step is not None
    # t = 1: m = 0.1 g, v = 0.01 g^2, eta = lr sqrt(0.01) / 0.1 = lr: step = lr * 0.1 g / (0.1 |g| + tau).
    g = np.array([0.5, -0.5, 0.0, 2.0])
    expect = 0.01 * 0.1 * g / (0.1 * np.abs(g) + 1e-3)
    np.testing.assert_allclose(step.step["w"], expect, rtol=1e-5)
    assert int(step.state["t"][0]) == 1 and set(step.state) == {"t", "m/w", "v/w"}
    e.commit(step, 0.0)
    # A restarted engine given the stored state continues the same moments.
    again = Engine(cfg, shapes=SHAPES, version=1, state=step.state)
    s2 = again.offer(_acc("a", [0.5, -0.5, 0.0, 2.0], base=1), 0.0)
    s_cont = e.offer(_acc("a", [0.5, -0.5, 0.0, 2.0], base=1), 0.0)
    assert s2 is not None and s_cont is not None
    np.testing.assert_array_equal(s2.step["w"], s_cont.step["w"])
    assert int(s2.state["t"][0]) == 2


def test_fedyogi_differs_from_fedadam_after_the_first_step() -> None:
    def two_steps(kind: str) -> np.ndarray:
        e = Engine(StrategyConfig(kind=kind, buffer_size=1), shapes=SHAPES)
        s1 = e.offer(_acc("a", 1.0), 0.0)
        assert s1 is not None
        e.commit(s1, 0.0)
        s2 = e.offer(_acc("a", 0.1, base=1), 0.0)
        assert s2 is not None
        return s2.step["w"]

    assert not np.allclose(two_steps("fedadam"), two_steps("fedyogi"))


class HalfStep(BaseStrategy):
    """A user strategy: the plain mean of every two updates, halved; counts its versions in its state."""

    def __init__(self, cfg: StrategyConfig, factor: float = 0.5) -> None:
        super().__init__(cfg)
        self.factor = factor

    def closes(self, view: BufferView) -> bool:
        return view.updates >= 2

    def aggregate(self, updates: Sequence[WeightedUpdate], state: dict[str, np.ndarray]) -> Aggregate:
        n = len(updates)
        step = {"w": sum(np.asarray(u.delta["w"], np.float32) for u in updates) * np.float32(self.factor / n)}
        made = state.get("made", np.zeros(1, np.float32)) + 1
        return Aggregate(step, [self.factor / n] * n, {"made": made})


def test_a_user_strategy_loads_from_its_dotted_name_with_its_options() -> None:
    cfg = StrategyConfig(kind="tests.coordinator.test_engine:HalfStep", options={"factor": 0.25})
    strategy = load_strategy(cfg)
    assert isinstance(strategy, HalfStep) and strategy.factor == 0.25
    e = Engine(cfg, shapes=SHAPES, strategy=strategy)
    assert e.offer(_acc("a", 4.0), 0.0) is None
    step = e.offer(_acc("b", 4.0), 0.0)
    assert step is not None and step.weights == (0.125, 0.125) and step.state["made"][0] == 1
    np.testing.assert_allclose(step.step["w"], 1.0)


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("no_such_module_xyz:Thing", {}, "cannot import 'no_such_module_xyz'"),
        ("tests.coordinator.test_engine:Missing", {}, "has no attribute 'Missing'"),
        ("tests.coordinator.test_engine:HalfStep", {"nope": 1}, "building it failed"),
        ("tests.coordinator.test_engine:NotAStrategy", {}, "does not fit the Strategy protocol"),
        ("fedbuff", {"x": 1}, "takes none"),
    ],
)
def test_a_strategy_that_cannot_load_is_named(kind: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(StrategyLoadError, match=message):
        load_strategy(StrategyConfig(kind=kind, options=options))


class NotAStrategy:
    def __init__(self, cfg: StrategyConfig) -> None:
        pass


def test_bad_kinds_are_refused_by_the_config() -> None:
    for kind in ("fedprox", "mod:", "a b:C", ":C"):
        with pytest.raises(ValueError, match="strategy.kind"):
            StrategyConfig(kind=kind)


def test_a_strategy_returning_the_wrong_number_of_weights_is_an_error() -> None:
    class Bad(BaseStrategy):
        def aggregate(self, updates: Sequence[WeightedUpdate], state: dict[str, np.ndarray]) -> Aggregate:
            return Aggregate({}, [], state)

    cfg = replace(StrategyConfig(), buffer_size=1)
    e = Engine(cfg, shapes=SHAPES, strategy=Bad(cfg))
    with pytest.raises(StrategyError, match="0 weights for 1 updates"):
        e.offer(_acc("a", 1.0), 0.0)


@pytest.mark.parametrize(
    "step, weights, state, message",
    [
        ({"nope": np.zeros(4)}, [1.0], {}, "'nope' of shape"),
        ({"w": np.zeros(5)}, [1.0], {}, "'w' of shape"),
        ({"w": np.zeros(4)}, [float("nan")], {}, "not finite"),
        ({"w": np.zeros(4)}, [1.0], {"s": "text"}, "arrays of numbers"),
    ],
)
def test_a_strategy_answer_the_engine_cannot_use_is_named(step: dict, weights: list, state: dict, message: str) -> None:
    class Odd(BaseStrategy):
        def aggregate(self, updates: Sequence[WeightedUpdate], st: dict[str, np.ndarray]) -> Aggregate:
            return Aggregate(step, weights, state)

    cfg = replace(StrategyConfig(), buffer_size=1)
    with pytest.raises(StrategyError, match=message):
        Engine(cfg, shapes=SHAPES, strategy=Odd(cfg)).offer(_acc("a", 1.0), 0.0)


def test_fedadam_is_a_builtin() -> None:
    assert isinstance(load_strategy(StrategyConfig(kind="fedadam")), FedAdam)
