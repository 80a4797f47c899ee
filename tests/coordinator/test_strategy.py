"""FedAsync, FedBuff and FedAvg, against hand-computed values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.strategy import (
    FedAsyncConfig,
    StrategyConfig,
    WeightedUpdate,
    buffered_step,
    fedasync_step,
    fedasync_weight,
    staleness_weight,
)


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


def _u(n: int, tau: int, **tensors: list[float]) -> WeightedUpdate:
    return WeightedUpdate({k: np.array(v, np.float32) for k, v in tensors.items()}, n, tau)


def test_fedasync_weight_is_alpha_times_staleness_weight() -> None:
    cfg = StrategyConfig(alpha=0.5, staleness="polynomial", a=1.0)
    assert fedasync_weight(0, cfg) == pytest.approx(0.5)
    assert fedasync_weight(3, cfg) == pytest.approx(0.5 / 4)


def test_fedbuff_weights_by_samples_and_staleness() -> None:
    # Hand-computed: p = (1/4, 3/4); s(tau) with a=1: s(0)=1, s(1)=1/2; eta_g = 2.
    # step = 2 * (1/4 * 1 * [4, 8] + 3/4 * 1/2 * [8, 0]) = 2 * ([1, 2] + [3, 0]) = [8, 4]
    cfg = StrategyConfig(kind="fedbuff", staleness="polynomial", a=1.0, server_lr=2.0, buffer_size=2)
    step = buffered_step([_u(1, 0, w=[4, 8]), _u(3, 1, w=[8, 0])], cfg)
    np.testing.assert_allclose(step["w"], [8.0, 4.0])
    assert step["w"].dtype == np.float32


def test_fedbuff_without_sample_weighting_averages_equally() -> None:
    cfg = StrategyConfig(kind="fedbuff", staleness="constant", weight_by_samples=False, server_lr=1.0)
    step = buffered_step([_u(1, 0, w=[3.0]), _u(99, 5, w=[1.0])], cfg)
    np.testing.assert_allclose(step["w"], [2.0])


def test_fedavg_weights_by_samples_and_a_straggler_by_staleness() -> None:
    cfg = StrategyConfig(kind="fedavg", staleness="polynomial", a=1.0, server_lr=1.0)
    step = buffered_step([_u(2, 0, w=[1.0, 0.0]), _u(6, 0, w=[5.0, 4.0])], cfg)
    np.testing.assert_allclose(step["w"], [0.25 * 1 + 0.75 * 5, 0.75 * 4])
    late = buffered_step([_u(2, 0, w=[1.0, 0.0]), _u(6, 1, w=[5.0, 4.0])], cfg)  # one round late: s(1) = 1/2
    np.testing.assert_allclose(late["w"], [0.25 * 1 + 0.75 * 0.5 * 5, 0.75 * 0.5 * 4])
    assert cfg.effective_max_staleness == cfg.round_late == 1


def test_mixed_fleets_aggregate_each_tensor_over_its_own_contributors() -> None:
    # The LoRA device carries 'lora'; the embedding device carries 'table'. Each tensor's
    # sample shares are normalised over the updates that carry it, so neither is diluted.
    cfg = StrategyConfig(kind="fedbuff", staleness="constant", server_lr=1.0)
    step = buffered_step([_u(4, 0, lora=[2.0]), _u(1, 0, table=[6.0]), _u(4, 0, lora=[4.0])], cfg)
    np.testing.assert_allclose(step["lora"], [3.0])
    np.testing.assert_allclose(step["table"], [6.0])


def test_an_empty_buffer_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        buffered_step([], StrategyConfig(kind="fedbuff"))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"kind": "fedprox"}, "kind"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"server_lr": 0.0}, "server_lr"),
        ({"staleness": "x"}, "staleness"),
    ],
)
def test_strategy_config_names_the_bad_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        StrategyConfig(**kwargs)


@given(st.integers(1, 6), st.integers(0, 2**16), st.sampled_from(["int8", "int4"]))
@settings(max_examples=25, deadline=None)
def test_decoded_updates_sum_as_their_dense_copies_do(n: int, seed: int, values: str) -> None:
    """The packed fast path of aggregation (as decoded from the wire) against dense arrays."""
    from compression import CodecConfig, compress_update, decode_frame

    rng = np.random.default_rng(seed)
    shapes = {"b.lora_B": (16, 4), "a.lora_A": (4, 24), "c.lora_A": (4, 7)}
    decoded = []
    for _ in range(n):
        delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        frame = compress_update(delta, CodecConfig(topk_fraction=0.3, values=values)).frame
        decoded.append(decode_frame(frame).tensors)
    assert all(t.packed is not None for t in decoded)  # type: ignore[attr-defined]
    cfg = StrategyConfig(kind="fedbuff", staleness="polynomial", a=0.5, server_lr=1.5)
    samples = rng.integers(1, 50, n)
    fast = buffered_step([WeightedUpdate(t, int(s), i % 3) for i, (t, s) in enumerate(zip(decoded, samples, strict=True))], cfg)
    dense = [{k: v.to_dense() for k, v in t.items()} for t in decoded]
    slow = buffered_step([WeightedUpdate(d, int(s), i % 3) for i, (d, s) in enumerate(zip(dense, samples, strict=True))], cfg)
    assert set(fast) == set(shapes)
    for k in shapes:
        assert fast[k].shape == shapes[k]
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-6, atol=1e-7)
