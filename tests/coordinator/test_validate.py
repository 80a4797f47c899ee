"""Every rejection reason of the validator, with real frames and envelopes."""

import hashlib

import numpy as np
import pytest

from compression import CodecConfig, FrameKind, compress_dense, compress_update, protocol
from compression.protocol import UpdateHeader
from coordinator.errors import Rejection
from coordinator.strategy import FedAsyncConfig
from coordinator.validate import validate_update

SHAPES = {"w": (4, 4), "v": (2,)}


def _payload(tensors=None, device="d1", base=3, uid="u1", kind=FrameKind.UPDATE, corrupt=False) -> bytes:  # type: ignore[no-untyped-def]
    tensors = tensors if tensors is not None else {"w": np.ones((4, 4), np.float32)}
    if kind is FrameKind.UPDATE:
        frame = compress_update(tensors, CodecConfig(topk_fraction=1.0, values="fp32")).frame
    else:
        frame = compress_dense(tensors, kind)
    if corrupt:
        frame = frame[:20] + bytes([frame[20] ^ 1]) + frame[21:]
    header = UpdateHeader(
        device=device, seq=1, update_id=uid, base_version=base, num_samples=4, timestamp=1.0, frame_sha256=hashlib.sha256(frame).hexdigest()
    )
    return protocol.encode_envelope(header, frame)


def _validate(payload: bytes, topic_device: str = "d1", current: int = 5, known=True, dup=False, norm=0.0):  # type: ignore[no-untyped-def]
    return validate_update(
        topic_device,
        payload,
        shapes=SHAPES,
        current_version=current,
        strategy=FedAsyncConfig(max_staleness=4),
        max_update_bytes=1 << 20,
        max_update_norm=norm,
        is_known_device=lambda d: known,
        is_duplicate=lambda u: dup,
    )


def test_a_valid_update_yields_its_dense_delta_and_staleness() -> None:
    v = _validate(_payload())
    assert v.staleness == 2
    np.testing.assert_array_equal(v.delta["w"], np.ones((4, 4)))


@pytest.mark.parametrize(
    "kwargs, payload_kwargs, reason",
    [
        ({}, {"corrupt": True}, "bad_checksum"),
        ({"topic_device": "d2"}, {}, "device_mismatch"),
        ({"known": False}, {}, "unknown_device"),
        ({"dup": True}, {}, "duplicate"),
        ({}, {"base": 9}, "future_version"),
        ({"current": 20}, {}, "too_stale"),
        ({}, {"tensors": {"w": np.ones((2, 8), np.float32)}}, "shape_mismatch"),
        ({}, {"tensors": {"zzz": np.ones(2, np.float32)}}, "shape_mismatch"),
        ({}, {"kind": FrameKind.SNAPSHOT}, "malformed_frame"),
        ({"norm": 1.0}, {}, "norm_bound"),
    ],
)
def test_rejection_reasons(kwargs: dict, payload_kwargs: dict, reason: str) -> None:
    with pytest.raises(Rejection) as info:
        _validate(_payload(**payload_kwargs), **kwargs)
    assert info.value.reason == reason


def test_garbage_is_malformed_not_a_crash() -> None:
    with pytest.raises(Rejection) as info:
        _validate(b"\x00" * 50)
    assert info.value.reason == "malformed_message"
