"""Frame encoding and the strict decoder."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from compression import CodecError, FrameKind, decode_frame, encode_frame
from compression.errors import ChecksumError, FrameError, LimitError
from compression.frame import FrameLimits, NonFiniteError, SparseTensor
from compression.indices import IndexCoding
from compression.quantize import ValueType


def _sample() -> dict[str, SparseTensor]:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(8, 16)).astype(np.float32)
    idx = np.array([0, 3, 7, 100, 511], dtype=np.int64)
    return {
        "a.lora_A.weight": SparseTensor(shape=(8, 16), values=dense.reshape(-1)),
        "b.lora_B.weight": SparseTensor(shape=(32, 16), values=rng.normal(size=5).astype(np.float32), indices=idx),
    }


@pytest.mark.parametrize("coding", list(IndexCoding))
@pytest.mark.parametrize("vtype", [ValueType.FP32, ValueType.FP16, ValueType.INT8, ValueType.INT4])
def test_round_trip_preserves_names_shapes_and_indices(vtype: ValueType, coding: IndexCoding) -> None:
    tensors = _sample()
    frame = decode_frame(encode_frame(FrameKind.UPDATE, tensors, values=vtype, int8_block=4, index_coding=coding))
    assert frame.kind is FrameKind.UPDATE
    assert list(frame.tensors) == list(tensors)
    for name, t in tensors.items():
        got = frame.tensors[name]
        assert got.shape == t.shape
        if t.indices is None:
            assert got.indices is None
        else:
            np.testing.assert_array_equal(got.indices, t.indices)
        tol = {ValueType.FP32: 0, ValueType.FP16: 2e-3, ValueType.INT8: 0.03, ValueType.INT4: 0.5 / 7}[vtype]
        np.testing.assert_allclose(got.values, t.values, atol=tol * float(np.abs(t.values).max()) + 1e-7)


def test_sign_values_are_the_block_mean_magnitude_with_the_sign() -> None:
    values = np.array([1.0, -3.0, 2.0, -2.0, 0.5], np.float32)
    frame = encode_frame(FrameKind.UPDATE, {"x": SparseTensor((5,), values)}, values=ValueType.SIGN, int8_block=2)
    np.testing.assert_allclose(decode_frame(frame).tensors["x"].values, [2.0, -2.0, 2.0, -2.0, 0.5])


@given(st.lists(st.integers(0, 5000), unique=True, max_size=300), st.sampled_from(list(IndexCoding)))
def test_every_index_coding_round_trips(idx: list[int], coding: IndexCoding) -> None:
    indices = np.array(sorted(idx), dtype=np.int64)
    t = SparseTensor((5001,), np.ones(indices.size, np.float32), indices)
    got = decode_frame(encode_frame(FrameKind.UPDATE, {"x": t}, index_coding=coding)).tensors["x"]
    np.testing.assert_array_equal(got.indices, indices)


def test_version_1_frames_may_not_use_version_2_codings() -> None:
    body = struct.pack("<I", 1) + _record(layout=2, payload=bytes([1, 0b11]) + struct.pack("<2f", 1, 2))
    with pytest.raises(FrameError, match="unknown layout 2 in a version 1 frame"):
        decode_frame(_reframe(body, version=1))
    assert decode_frame(_reframe(body, version=2)).tensors["t"].indices.tolist() == [1, 2]


def test_int4_frames_are_version_3_and_everything_else_stays_version_2() -> None:
    for vtype in ValueType:
        frame = encode_frame(FrameKind.UPDATE, _sample(), values=vtype, int8_block=4)
        assert frame[4] == (3 if vtype is ValueType.INT4 else 2), vtype


def test_version_2_frames_may_not_carry_int4_values() -> None:
    record = _record(shape=(3,), layout=0, vtype=ValueType.INT4, block=4, nnz=3, payload=struct.pack("<f", 1.0) + bytes([0x21, 0x03]))
    body = struct.pack("<I", 1) + record
    with pytest.raises(FrameError, match="unknown value type 4 in a version 2 frame"):
        decode_frame(_reframe(body, version=2))
    assert decode_frame(_reframe(body, version=3)).tensors["t"].values.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(FrameError, match="padding nibble"):
        decode_frame(_reframe(body[:-1] + bytes([0x13]), version=3))


def test_fp32_round_trip_is_exact() -> None:
    tensors = _sample()
    frame = decode_frame(encode_frame(FrameKind.SNAPSHOT, tensors, values=ValueType.FP32))
    for name, t in tensors.items():
        np.testing.assert_array_equal(frame.tensors[name].to_dense(), t.to_dense())


def _valid() -> bytes:
    return encode_frame(FrameKind.UPDATE, _sample(), values=ValueType.INT8)


def _reframe(body: bytes, kind: int = 1, version: int = 1, flags: int = 0) -> bytes:
    """A frame with a correct checksum around an arbitrary body, to reach the body checks."""
    import zstandard

    comp = zstandard.ZstdCompressor().compress(body)
    header = struct.pack("<4sBBHII", b"FEDG", version, kind, flags, len(body), len(comp))
    return header + comp + struct.pack("<I", zlib.crc32(comp, zlib.crc32(header)))


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda f: b"XXXX" + f[4:], FrameError, "bad magic"),
        (lambda f: f[:10], FrameError, "shorter than header"),
        (lambda f: f[:-1], FrameError, "compressed length"),
        (lambda f: f[:20] + bytes([f[20] ^ 1]) + f[21:], ChecksumError, "checksum"),
    ],
)
def test_decoder_names_what_is_wrong(mutate, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        decode_frame(mutate(_valid()))


def test_unknown_version_kind_and_flags_are_rejected() -> None:
    body = struct.pack("<I", 0)
    with pytest.raises(FrameError, match="version 4"):
        decode_frame(_reframe(body, version=4))
    with pytest.raises(FrameError, match="kind 9"):
        decode_frame(_reframe(body, kind=9))
    with pytest.raises(FrameError, match="flags"):
        decode_frame(_reframe(body, flags=1))


def _record(
    name: bytes = b"t",
    shape: tuple[int, ...] = (4,),
    layout: int = 1,
    vtype: int = 0,
    block: int = 0,
    nnz: int = 2,
    payload: bytes | None = None,
) -> bytes:
    head = struct.pack("<H", len(name)) + name + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
    head += struct.pack("<BBII", layout, vtype, block, nnz)
    if payload is None:
        payload = struct.pack("<2I", 0, 1) + struct.pack("<2f", 1.0, 2.0)
    return head + payload


@pytest.mark.parametrize(
    "body, message",
    [
        (struct.pack("<I", 1) + _record(payload=struct.pack("<2I", 0, 4) + struct.pack("<2f", 1, 2)), "out of range"),
        (struct.pack("<I", 1) + _record(payload=struct.pack("<2I", 1, 0) + struct.pack("<2f", 1, 2)), "strictly increasing"),
        (struct.pack("<I", 1) + _record(nnz=5), "5 sparse values for 4"),
        (struct.pack("<I", 1) + _record(layout=0, nnz=2), "dense with 2 values"),
        (struct.pack("<I", 1) + _record(vtype=7), "unknown value type"),
        (struct.pack("<I", 1) + _record(layout=3), "unknown layout"),
        (struct.pack("<I", 1) + _record(vtype=0, block=4), "block size"),
        (struct.pack("<I", 1) + _record(shape=(0,)), "empty dimension"),
        (struct.pack("<I", 1) + _record(name=b"\xff\xfe"), "UTF-8"),
        (struct.pack("<I", 2) + _record() + _record(), "appears twice"),
        (struct.pack("<I", 1) + _record() + b"\x00", "trailing bytes"),
        (struct.pack("<I", 2) + _record(), "truncated"),
        (struct.pack("<I", 1) + _record(payload=struct.pack("<2I", 0, 1) + struct.pack("<2f", 1, float("nan"))), "not all finite"),
        (
            struct.pack("<I", 1) + _record(vtype=2, block=2, payload=struct.pack("<2I", 0, 1) + struct.pack("<f", -1.0) + b"\x01\x02"),
            "scales",
        ),
    ],
)
def test_body_inconsistencies_raise_codec_errors(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_frame(_reframe(body))


def test_non_finite_has_its_own_reason() -> None:
    body = struct.pack("<I", 1) + _record(payload=struct.pack("<2I", 0, 1) + struct.pack("<2f", 1, float("inf")))
    with pytest.raises(NonFiniteError) as info:
        decode_frame(_reframe(body))
    assert info.value.reason == "non_finite"


def test_limits_are_enforced_before_allocation() -> None:
    frame = _valid()
    with pytest.raises(LimitError):
        decode_frame(frame, FrameLimits(max_frame_bytes=len(frame) - 1))
    with pytest.raises(LimitError):
        decode_frame(_reframe(struct.pack("<I", 1) + _record(shape=(1 << 15, 1 << 15))), FrameLimits(max_numel=1 << 20))
    with pytest.raises(LimitError):
        decode_frame(_reframe(struct.pack("<I", 10_000)), FrameLimits(max_tensors=100))


def test_encoder_rejects_bad_input() -> None:
    with pytest.raises(CodecError, match="non-finite"):
        encode_frame(FrameKind.UPDATE, {"x": SparseTensor((2,), np.array([1.0, np.nan], np.float32))})
    with pytest.raises(CodecError, match="strictly increasing"):
        encode_frame(FrameKind.UPDATE, {"x": SparseTensor((4,), np.ones(2, np.float32), np.array([2, 1]))})
    with pytest.raises(CodecError, match="fp16 range"):
        encode_frame(FrameKind.UPDATE, {"x": SparseTensor((1,), np.array([1e6], np.float32))}, values=ValueType.FP16)


# --- fuzzing: the decoder never fails with anything but a CodecError ------------------


@given(st.binary(max_size=512))
def test_random_bytes_raise_codec_error_only(data: bytes) -> None:
    try:
        decode_frame(data)
    except CodecError:
        pass


@given(st.data())
def test_truncated_and_bit_flipped_frames_raise_codec_error_only(data: st.DataObject) -> None:
    frame = bytearray(_valid())
    if data.draw(st.booleans()):
        frame = frame[: data.draw(st.integers(0, len(frame) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= 1 << data.draw(st.integers(0, 7))
    assume(bytes(frame) != _valid())
    with pytest.raises(CodecError):
        decode_frame(bytes(frame))


@given(st.binary(min_size=4, max_size=300), st.sampled_from([1, 2, 3]))
def test_garbage_bodies_with_valid_checksum_raise_codec_error_only(body: bytes, version: int) -> None:
    try:
        decode_frame(_reframe(body, version=version))
    except CodecError:
        pass


@given(st.data())
def test_mutated_bodies_raise_codec_error_only(data: st.DataObject) -> None:
    import zstandard

    coding = data.draw(st.sampled_from(list(IndexCoding)))
    vtype = data.draw(st.sampled_from(list(ValueType)))
    valid = encode_frame(FrameKind.UPDATE, _sample(), values=vtype, int8_block=4, index_coding=coding)
    body = bytearray(zstandard.ZstdDecompressor().decompress(valid[16:-4]))
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        decode_frame(_reframe(bytes(body), version=valid[4]))
    except CodecError:
        pass


@given(
    st.lists(st.lists(st.integers(0, 3000), unique=True, min_size=1, max_size=200), min_size=1, max_size=6),
    st.sampled_from([ValueType.INT8, ValueType.INT4]),
    st.integers(1, 64),
)
def test_batched_varint_records_decode_like_single_ones(index_sets: list[list[int]], vtype: ValueType, block: int) -> None:
    rng = np.random.default_rng(len(index_sets))
    tensors = {}
    for k, idx in enumerate(index_sets):
        indices = np.array(sorted(idx), dtype=np.int64)
        tensors[f"t{k}"] = SparseTensor((3001,), rng.normal(size=indices.size).astype(np.float32), indices)
    frame = decode_frame(encode_frame(FrameKind.UPDATE, tensors, values=vtype, int8_block=block, index_coding=IndexCoding.VARINT))
    assert list(frame.tensors) == list(tensors)
    for name, t in tensors.items():
        got = frame.tensors[name]
        np.testing.assert_array_equal(got.indices, t.indices)
        # Each value is within half a quantisation step of its block's scale.
        qmax = 127 if vtype is ValueType.INT8 else 7
        blocks = [t.values[i : i + block] for i in range(0, t.values.size, block)]
        bound = np.concatenate([np.full(b.size, np.abs(b).max() / qmax / 2 + 1e-6) for b in blocks])
        assert np.all(np.abs(got.values - t.values) <= bound)


@given(
    st.lists(st.lists(st.integers(0, 70000), unique=True, max_size=300), min_size=1, max_size=6),
    st.sampled_from([ValueType.INT8, ValueType.INT4, ValueType.FP32]),
    st.integers(1, 300),
    st.floats(1e-30, 1e30),
)
def test_the_batched_encoder_writes_what_the_record_encoder_writes(
    index_sets: list[list[int]], vtype: ValueType, block: int, scale: float
) -> None:
    from compression.frame import _encode_batch, _encode_record

    rng = np.random.default_rng(len(index_sets))
    tensors = {}
    for k, idx in enumerate(index_sets):
        indices = np.array(sorted(idx), dtype=np.int64)
        values = (rng.normal(size=indices.size) * scale).astype(np.float32)
        values[rng.random(indices.size) < 0.1] = 0.0  # zeros and all-zero blocks
        tensors[f"layer.{k}.weight"] = SparseTensor((70001,) if k % 2 else (7, 10001), values, indices)
    batched = _encode_batch(tensors, vtype, block)
    assert batched is not None
    single = b"".join(_encode_record(n, t, vtype, block, IndexCoding.VARINT) for n, t in tensors.items())
    assert b"".join(batched) == single


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 400)), min_size=1, max_size=8), st.integers(0, 3))
def test_snapshots_of_dense_and_sparse_records_encode_as_record_by_record(kinds: list[tuple[bool, int]], level: int) -> None:
    from compression.frame import _encode_record, _encode_records

    rng = np.random.default_rng(len(kinds))
    tensors = {}
    for k, (dense, n) in enumerate(kinds):
        flat = rng.normal(size=n).astype(np.float32)
        if dense:
            tensors[f"t{k}"] = SparseTensor((n,), flat)
        else:
            idx = np.flatnonzero(rng.random(n) < 0.2)
            tensors[f"t{k}"] = SparseTensor((n,), flat[idx], idx)
    fast = b"".join(_encode_records(tensors, ValueType.FP32, 1, IndexCoding.VARINT))
    assert fast == b"".join(_encode_record(n, t, ValueType.FP32, 1, IndexCoding.VARINT) for n, t in tensors.items())
    decoded = decode_frame(encode_frame(FrameKind.SNAPSHOT, tensors, zstd_level=level, index_coding=IndexCoding.VARINT))
    for name, t in tensors.items():
        np.testing.assert_array_equal(decoded.tensors[name].to_dense(), t.to_dense())


def test_the_batched_encoder_leaves_bad_input_to_the_record_encoder() -> None:
    from compression.frame import _encode_batch

    good = SparseTensor((10,), np.ones(2, np.float32), np.array([1, 3]))
    for bad in (
        SparseTensor((10,), np.ones(2, np.float32), np.array([3, 1])),
        SparseTensor((10,), np.ones(2, np.float32), np.array([1, 10])),
        SparseTensor((10,), np.array([1.0, np.nan], np.float32), np.array([1, 3])),
        SparseTensor((10,), np.ones(3, np.float32), np.array([1, 3])),
    ):
        assert _encode_batch({"a": good, "b": bad}, ValueType.INT8, 4) is None
        with pytest.raises(CodecError):
            encode_frame(FrameKind.UPDATE, {"a": good, "b": bad}, values=ValueType.INT8, index_coding=IndexCoding.VARINT)
    # A dense record is not the batch's kind, but a valid frame.
    dense = {"a": good, "b": SparseTensor((10,), np.ones(10, np.float32))}
    assert _encode_batch(dense, ValueType.INT8, 4) is None
    assert list(decode_frame(encode_frame(FrameKind.UPDATE, dense, values=ValueType.INT8, index_coding=IndexCoding.VARINT)).tensors) == [
        "a",
        "b",
    ]


def test_a_bad_record_in_a_batch_is_named() -> None:
    import zstandard

    tensors = {f"layer{k}": SparseTensor((100,), np.ones(3, np.float32), np.array([1, 5, 9])) for k in range(4)}
    frame = encode_frame(FrameKind.UPDATE, tensors, values=ValueType.INT8, index_coding=IndexCoding.VARINT)
    body = bytearray(zstandard.ZstdDecompressor().decompress(frame[16:-4]))
    # In layer2's record, make the second gap 0 (indices no longer strictly increasing).
    pos = body.index(b"layer2") + len(b"layer2") + 1 + 4 + 10 + 4
    assert list(body[pos : pos + 3]) == [1, 4, 4]
    body[pos + 1] = 0
    with pytest.raises(FrameError, match="'layer2': indices are not strictly increasing"):
        decode_frame(_reframe(bytes(body), version=2))


def _lying_zstd_frame(claimed: int, body_len: int = 1000) -> bytes:
    """A frame whose zstd header claims ``claimed`` bytes while the FEDG header says ``body_len``."""
    import struct
    import zlib

    import zstandard

    z = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * body_len)
    fhd = z[4]
    fcs_len = {0: 1, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    z = z[:4] + bytes([(fhd & 0x3F) | 0xC0]) + claimed.to_bytes(8, "little") + z[5 + fcs_len :]
    header = struct.pack("<4sBBHII", b"FEDG", 2, 1, 0, body_len, len(z))
    return header + z + struct.pack("<I", zlib.crc32(z, zlib.crc32(header)))


def test_a_zstd_header_claiming_64_gib_is_refused_without_allocating() -> None:
    import tracemalloc

    from compression import FrameError

    frame = _lying_zstd_frame(1 << 36)
    assert len(frame) < 512
    tracemalloc.start()
    with pytest.raises(FrameError, match="declares"):
        decode_frame(frame)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_a_decoder_allocates_at_most_a_small_multiple_of_its_limits() -> None:
    """A real bomb (256 MiB of zeros in a few KB) against limits sized for a small state."""
    import struct
    import tracemalloc
    import zlib

    import zstandard

    from compression import FrameLimits, LimitError

    shapes = {"w": (64, 64)}
    limits = FrameLimits.for_shapes(shapes, 1 << 20)
    for body_len in (256 << 20, limits.max_body_bytes):
        z = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(b"\0" * body_len)
        header = struct.pack("<4sBBHII", b"FEDG", 2, 1, 0, body_len, len(z))
        frame = header + z + struct.pack("<I", zlib.crc32(z, zlib.crc32(header)))
        tracemalloc.start()
        with pytest.raises((LimitError, FrameError)):
            decode_frame(frame, limits)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 4 * limits.max_body_bytes + (1 << 20), (body_len, peak)


def test_a_frame_without_a_declared_content_size_is_refused() -> None:
    import struct
    import zlib

    import zstandard

    from compression import FrameError

    z = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    header = struct.pack("<4sBBHII", b"FEDG", 2, 1, 0, 100, len(z))
    with pytest.raises(FrameError, match="content size"):
        decode_frame(header + z + struct.pack("<I", zlib.crc32(z, zlib.crc32(header))))


def test_frames_may_not_declare_more_elements_than_the_limits_hold() -> None:
    from compression import FrameLimits, LimitError

    frame = encode_frame(FrameKind.UPDATE, {"w": SparseTensor((1 << 20,), np.ones(1, np.float32), np.array([5]))})
    with pytest.raises(LimitError, match="elements"):
        decode_frame(frame, FrameLimits(max_total_numel=1 << 10))


def _outcome(frame: bytes, limits: FrameLimits = FrameLimits()) -> object:
    """What decoding gives: the exception's type and text, or every tensor's fields."""
    try:
        got = decode_frame(frame, limits)
    except CodecError as exc:
        return type(exc), str(exc)
    return [(n, t.shape, t.indices.tolist() if t.indices is not None else None, t.values.tolist()) for n, t in got.tensors.items()]


def _default_codec_frame(seed: int, vtype: ValueType = ValueType.INT4, block: int = 8, values_seed: int = 0) -> bytes:
    """A frame of three top-k tensors of one record table; ``seed`` and ``values_seed`` set how
    many values each tensor has (top-k over all tensors varies it), which and what they are."""
    rng = np.random.default_rng([seed, values_seed])
    tensors = {}
    for k, n in enumerate((97, 64, 3001)):
        idx = np.sort(rng.choice(n, size=int(rng.integers(1, 40)), replace=False))
        tensors[f"layer.{k}.lora_A.weight"] = SparseTensor((n,), rng.normal(size=idx.size).astype(np.float32), idx)
    return encode_frame(FrameKind.UPDATE, tensors, values=vtype, int8_block=block, index_coding=IndexCoding.VARINT)


@given(st.data())
def test_a_frame_of_a_known_record_table_decodes_exactly_as_a_first_one(data: st.DataObject) -> None:
    """The short way (record headers compared as bytes with a table seen before) gives the same
    tensors, or the same error, as the long way, for valid and damaged bodies alike."""
    import zstandard

    from compression import frame as frame_mod

    vtype = data.draw(st.sampled_from([ValueType.INT8, ValueType.INT4]))
    valid = _default_codec_frame(data.draw(st.integers(0, 50)), vtype)
    body = bytearray(zstandard.ZstdDecompressor().decompress(valid[16:-4]))
    for _ in range(data.draw(st.integers(0, 3))):
        body[data.draw(st.integers(0, len(body) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    damaged = _reframe(bytes(body), version=valid[4])
    frame_mod._KNOWN.clear()
    first = _outcome(damaged)
    _outcome(valid)  # now its table is known
    assert frame_mod._KNOWN
    assert _outcome(damaged) == first


def test_a_known_record_table_is_used_and_still_obeys_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from compression import frame as frame_mod

    frame_mod._KNOWN.clear()
    a, b = _default_codec_frame(1), _default_codec_frame(1, block=4)
    expected = _outcome(a)
    with monkeypatch.context() as m:  # the short way reads no record header
        m.setattr(frame_mod, "_read_header", lambda *a: pytest.fail("a known table's headers were parsed"))
        assert _outcome(a) == expected
        other = _outcome(_default_codec_frame(1, values_seed=1))
        assert isinstance(other, list) and other != expected
    # Another table (another block size): the long way, then known too.
    assert _outcome(b) != expected and len(frame_mod._KNOWN) == 2
    # Limits tighter than those the table was first read under still refuse the frame.
    tight = FrameLimits(max_numel=100)
    assert _outcome(a, tight)[0] is LimitError  # type: ignore[index]
    assert _outcome(a, FrameLimits(max_total_numel=1000))[0] is LimitError  # type: ignore[index]


def test_the_known_record_tables_are_bounded() -> None:
    from compression import frame as frame_mod

    frame_mod._KNOWN.clear()
    for block in range(1, 12):
        decode_frame(_default_codec_frame(3, block=block))
        decode_frame(_default_codec_frame(3, block=block, values_seed=1))  # the same table again: not kept twice
    assert len(frame_mod._KNOWN) == frame_mod._MAX_KNOWN
    assert len({tuple(k.head_bytes or ()) for k in frame_mod._KNOWN}) == frame_mod._MAX_KNOWN
