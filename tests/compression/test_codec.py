"""Top-k, quantization bounds and error feedback, as properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compression import CodecConfig, CodecError, ErrorFeedback, FrameKind, apply_delta, compress_update, decode_frame, state_digest
from compression.quantize import dequantize_int8, pack_int4, quantize_int8, unpack_int4
from compression.sparsify import k_for, rotating_global, rotating_period, topk_global, topk_per_tensor

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = arrays(np.float32, st.integers(1, 300), elements=finite)


@given(vectors, st.floats(0.01, 1.0))
def test_topk_keeps_the_k_largest_magnitudes(x: np.ndarray, fraction: float) -> None:
    sparse = topk_per_tensor({"x": x}, fraction)["x"]
    if fraction >= 1.0:  # everything goes: densely, or as the non-zeros of a mostly-zero tensor
        np.testing.assert_array_equal(sparse.to_dense(), x)
        return
    k = min(k_for(x.size, fraction), int(np.count_nonzero(x)))
    idx = np.arange(x.size) if sparse.indices is None else sparse.indices
    assert idx.size == k
    kept = np.abs(x[idx])
    dropped = np.abs(np.delete(x, idx))
    if dropped.size and kept.size:
        assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(sparse.values, x[idx])
    assert np.all(sparse.values != 0)


@given(st.lists(vectors, min_size=1, max_size=4), st.floats(0.01, 0.99))
def test_global_topk_keeps_the_k_largest_over_all_tensors(xs: list[np.ndarray], fraction: float) -> None:
    tensors = {f"t{i}": x for i, x in enumerate(xs)}
    sparse = topk_global(tensors, fraction)
    total = sum(x.size for x in xs)
    nonzero = sum(int(np.count_nonzero(x)) for x in xs)
    assert sum(t.values.size for t in sparse.values()) == min(k_for(total, fraction), nonzero)
    kept = np.concatenate([np.abs(t.values) for t in sparse.values()])
    dropped = np.concatenate([np.abs(np.delete(tensors[n], t.indices)) for n, t in sparse.items()])
    if dropped.size and kept.size:
        assert kept.min() >= dropped.max()


@given(vectors, st.integers(1, 64))
def test_int8_error_is_at_most_half_a_step(x: np.ndarray, block: int) -> None:
    codes, scales = quantize_int8(x, block)
    back = dequantize_int8(codes, scales, block)
    bound = scales[np.arange(x.size) // block] / 2 + 1e-6 * np.abs(x)
    assert np.all(np.abs(back - x) <= bound + 1e-7)


@given(vectors, st.integers(1, 64))
def test_int4_codes_stay_in_range_and_the_error_is_at_most_half_a_step(x: np.ndarray, block: int) -> None:
    codes, scales = quantize_int8(x, block, qmax=7)
    assert codes.size == 0 or int(np.abs(codes).max()) <= 7
    np.testing.assert_array_equal(unpack_int4(pack_int4(codes), codes.size), codes)
    back = dequantize_int8(codes, scales, block)
    bound = scales[np.arange(x.size) // block] / 2 + 1e-6 * np.abs(x)
    assert np.all(np.abs(back - x) <= bound + 1e-7)


@given(
    st.lists(arrays(np.float32, (6, 5), elements=finite), min_size=1, max_size=6),
    st.sampled_from(["int8", "int4", "sign", "fp16", "fp32"]),
    st.sampled_from(["magnitude", "rotating"]),
)
def test_error_feedback_conserves_the_sum_of_deltas(deltas: list[np.ndarray], values: str, selection: str) -> None:
    cfg = CodecConfig(topk_fraction=0.2, values=values, selection=selection)  # type: ignore[arg-type]
    fb = ErrorFeedback()
    sent_total = np.zeros((6, 5), np.float64)
    for phase, d in enumerate(deltas):
        out = compress_update({"w": d}, cfg, fb, phase=phase)
        sent_total += out.sent["w"]
        fb = out.feedback
    total = np.sum(np.stack(deltas).astype(np.float64), axis=0)
    np.testing.assert_allclose(sent_total + fb.residual["w"], total, rtol=1e-4, atol=1e-3)


def test_sent_is_exactly_what_the_receiver_decodes() -> None:
    rng = np.random.default_rng(1)
    delta = {"a": rng.normal(size=(64, 8)).astype(np.float32), "b": rng.normal(size=(8, 64)).astype(np.float32)}
    for scope in ("tensor", "global"):
        out = compress_update(delta, CodecConfig(topk_fraction=0.05, topk_scope=scope))
        decoded = decode_frame(out.frame).dense()
        for name in delta:
            np.testing.assert_array_equal(decoded[name], out.sent[name])
            if scope == "tensor":
                assert np.count_nonzero(out.sent[name]) <= k_for(delta[name].size, 0.05)
        assert sum(np.count_nonzero(v) for v in out.sent.values()) <= k_for(sum(d.size for d in delta.values()), 0.05)


def test_compressed_update_is_much_smaller_than_dense() -> None:
    rng = np.random.default_rng(2)
    delta = {f"l{i}": rng.normal(size=(8, 576)).astype(np.float32) for i in range(20)}
    out = compress_update(delta, CodecConfig(topk_fraction=0.01, values="int8"))
    assert out.dense_fp32_bytes / len(out.frame) > 50


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"values": "int2"}, "int2"),
        ({"zstd_level": 40}, "zstd_level"),
        ({"topk_scope": "row"}, "topk_scope"),
        ({"selection": "random"}, "selection"),
    ],
)
def test_codec_config_names_the_bad_value(kwargs: dict, key: str) -> None:
    with pytest.raises(CodecError, match=key):
        CodecConfig(**kwargs)


def test_empty_and_non_finite_deltas_are_refused() -> None:
    with pytest.raises(CodecError, match="at least one tensor"):
        compress_update({}, CodecConfig())
    with pytest.raises(CodecError, match="non-finite"):
        compress_update({"x": np.array([np.inf], np.float32)}, CodecConfig())


def test_apply_delta_and_digest_make_receivers_bit_identical() -> None:
    rng = np.random.default_rng(3)
    state = {"a": rng.normal(size=(16, 4)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    update = compress_update({"a": rng.normal(size=(16, 4)).astype(np.float32)}, CodecConfig(topk_fraction=0.1))
    coordinator = apply_delta(state, update.sent)
    device = apply_delta({k: v.copy() for k, v in state.items()}, decode_frame(update.frame).dense())
    assert state_digest(coordinator) == state_digest(device) != state_digest(state)
    assert coordinator["b"] is state["b"]


def test_apply_delta_refuses_unknown_tensors_and_shapes() -> None:
    state = {"a": np.zeros(2, np.float32)}
    with pytest.raises(CodecError, match="does not have"):
        apply_delta(state, {"z": np.zeros(2, np.float32)})
    with pytest.raises(CodecError, match="shape"):
        apply_delta(state, {"a": np.zeros(3, np.float32)})


def test_residual_of_tensors_not_in_an_update_is_kept() -> None:
    cfg = CodecConfig(topk_fraction=0.5)
    first = compress_update({"a": np.array([1.0, 0.1], np.float32), "b": np.array([2.0, 0.2], np.float32)}, cfg)
    second = compress_update({"a": np.array([0.0, 0.0], np.float32)}, cfg, first.feedback)
    np.testing.assert_allclose(second.feedback.residual["b"], first.feedback.residual["b"])


def test_snapshots_of_mostly_zero_tables_are_sparse_and_bit_exact() -> None:
    from compression.codec import compress_dense

    table = np.zeros((4096, 16), np.float32)
    table[[3, 700, 4000]] = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    table[5, 0] = -0.0  # a negative zero must survive: digests compare bytes
    dense = {"lora_A": np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32), "table": table}
    frame = compress_dense(dense, FrameKind.SNAPSHOT)
    decoded = decode_frame(frame).dense()
    assert state_digest(decoded) == state_digest(dense)
    assert np.signbit(decoded["table"][5, 0])
    assert decode_frame(frame).tensors["table"].indices is not None
    assert len(frame) < 4096 * 16 * 4 / 50


shapes = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 9)), min_size=1, max_size=4)


@given(shapes, st.integers(1, 12), st.integers(0, 10_000))
def test_rotating_selection_sends_every_coordinate_once_per_period(dims: list[tuple[int, int]], period: int, start: int) -> None:
    tensors = {f"t{i}": np.ones(d, np.float32) for i, d in enumerate(dims)}
    hits = {n: np.zeros(a.size, np.int64) for n, a in tensors.items()}
    assert rotating_period(1.0 / period) == period
    for phase in range(start, start + period):
        for n, rec in rotating_global(tensors, 1.0 / period, phase).items():
            assert rec.indices is not None and np.all(np.diff(rec.indices) == period)
            hits[n][rec.indices] += 1
    assert all(np.all(h == 1) for h in hits.values())


@given(arrays(np.float32, (12, 7), elements=finite), arrays(np.float32, (12, 7), elements=finite), st.integers(0, 99))
def test_rotating_selection_depends_only_on_shapes_and_phase(a: np.ndarray, b: np.ndarray, phase: int) -> None:
    a, b = a + np.float32(2e3), b - np.float32(2e3)  # no exact zeros: every tensor has something to send
    cfg = CodecConfig(topk_fraction=0.25, values="int8", selection="rotating")
    sa = compress_update({"w": a}, cfg, phase=phase).sent["w"] != 0
    sb = compress_update({"w": b}, cfg, phase=phase).sent["w"] != 0
    np.testing.assert_array_equal(sa, sb)


def test_rotating_indices_cost_almost_nothing() -> None:
    rng = np.random.default_rng(3)
    delta = {f"l{i}": rng.normal(size=(576, 8)).astype(np.float32) for i in range(20)}
    rotating = compress_update(delta, CodecConfig(topk_fraction=1 / 16, values="sign", selection="rotating"))
    values_only = 20 * 576 * 8 // 16 // 8 + 4 * 20 * 2  # sign bits and block scales
    assert len(rotating.frame) < 1.25 * values_only + 40 * 20


def test_a_rescaled_rotating_update_is_unbiased() -> None:
    """fp32 values: over one period the mean of what is sent is exactly the delta, and no residual builds up."""
    rng = np.random.default_rng(4)
    delta = {"a": rng.normal(size=(10, 8)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    cfg = CodecConfig(topk_fraction=0.2, values="fp32", selection="rotating", rescale=True)
    fb, total = ErrorFeedback(), {n: np.zeros_like(d, dtype=np.float64) for n, d in delta.items()}
    for phase in range(5):
        out = compress_update(delta, cfg, fb, phase=phase)
        fb = out.feedback
        for n in total:
            total[n] += out.sent[n]
    for n, d in delta.items():
        np.testing.assert_allclose(total[n] / 5, d, rtol=1e-5, atol=1e-6)
        assert not np.any(fb.residual[n])


def test_a_rescaled_update_carries_its_quantization_error() -> None:
    rng = np.random.default_rng(5)
    delta = {"w": rng.normal(size=(64,)).astype(np.float32)}
    cfg = CodecConfig(topk_fraction=0.25, values="int4", selection="rotating", rescale=True)
    out = compress_update(delta, cfg, phase=1)
    idx = np.arange(1, 64, 4)
    np.testing.assert_allclose(out.sent["w"][idx] + 4 * out.feedback.residual["w"][idx], 4 * delta["w"][idx], rtol=1e-5, atol=1e-6)
    assert not np.any(np.delete(out.feedback.residual["w"], idx)) and not np.any(np.delete(out.sent["w"], idx))


@given(arrays(np.float32, 200, elements=finite), st.integers(0, 60))
def test_a_full_fraction_keeps_every_non_zero_and_codes_mostly_zero_tensors_sparse(x: np.ndarray, nonzero: int) -> None:
    x = x.copy()
    x[nonzero:] = 0
    out = compress_update({"w": x}, CodecConfig(topk_fraction=1.0, values="fp32", error_feedback=False))
    np.testing.assert_array_equal(out.sent["w"], x)
    record = decode_frame(out.frame).tensors["w"]
    assert (record.indices is not None) == (np.count_nonzero(x) < 200 // 3)


def test_a_rescaled_update_that_would_overflow_is_refused_by_name() -> None:
    cfg = CodecConfig(topk_fraction=0.25, values="int8", selection="rotating", rescale=True)
    with pytest.raises(CodecError, match="'w'.*overflows"):
        compress_update({"w": np.full(8, 3e38, np.float32)}, cfg)
