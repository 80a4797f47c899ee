"""A site's partial aggregate on the wire: round trips, signatures, and hostile bytes (hypothesis)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import FrameKind, compress_dense, decode_frame
from compression.partial import MAGIC, Group, Partial, PartialError, decode


def _sign(msg: bytes) -> bytes:
    return b"\x07" * 64


def _accept(site: str):  # type: ignore[no-untyped-def]
    return lambda sig, msg: sig == b"\x07" * 64


def _partial(groups: int = 2) -> Partial:
    gs = []
    for i in range(groups):
        frame = compress_dense({"w": np.full((3, 4), float(i + 1), np.float32)}, FrameKind.UPDATE)
        gs.append(Group(i, 4.0 * (i + 1), i + 1, tuple(f"d{i}-{j}" for j in range(i + 1)), frame))
    return Partial("site-a", 12, 1.5, tuple(gs))


def test_a_partial_survives_the_wire() -> None:
    p = _partial(3)
    back = decode(p.encode(_sign), _accept)
    assert back == p and back.partial_id == "site-a-000000000012" and back.updates == 6
    assert np.array_equal(decode_frame(back.groups[2].frame).dense()["w"], np.full((3, 4), 3.0, np.float32))


def test_signatures_ids_and_repeats_are_checked() -> None:
    wire = _partial().encode(_sign)
    with pytest.raises(PartialError, match="does not verify"):
        decode(wire, lambda site: lambda sig, msg: False)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from compression.keys import ed25519_verifier

    key = Ed25519PrivateKey.generate()

    def real(site: str):  # type: ignore[no-untyped-def]
        return ed25519_verifier(key.public_key())

    signed = _partial().encode(key.sign)
    assert decode(signed, real).updates == 3
    tampered = bytearray(signed)
    tampered[-80] ^= 1  # inside the last group's frame
    with pytest.raises(PartialError, match="does not verify"):
        decode(bytes(tampered), real)
    twice = Partial("site-a", 1, 0.0, (Group(0, 1.0, 1, ("u1",), b"x"), Group(1, 1.0, 1, ("u1",), b"y")))
    with pytest.raises(PartialError, match="repeat"):
        decode(twice.encode(_sign), _accept)
    with pytest.raises(PartialError, match="count ids"):
        decode(Partial("site-a", 1, 0.0, (Group(0, 1.0, 2, ("u1",), b"x"),)).encode(_sign), _accept)
    with pytest.raises(PartialError, match="weight"):
        decode(Partial("site-a", 1, 0.0, (Group(0, 0.0, 1, ("u1",), b"x"),)).encode(_sign), _accept)
    with pytest.raises(PartialError, match="site id"):
        decode(Partial("site/a", 1, 0.0, (Group(0, 1.0, 1, ("u1",), b"x"),)).encode(_sign), _accept)


def test_lengths_that_claim_more_than_the_payload_are_refused_before_allocating() -> None:
    claim = MAGIC + struct.pack("<I", 1 << 30) + b"{}" + b"\x00" * 70
    with pytest.raises(PartialError, match="does not fit"):
        decode(claim, _accept)
    wire = _partial().encode(_sign)
    with pytest.raises(PartialError):
        decode(wire[:-70] + wire[-64:], _accept)  # a frame cut short
    with pytest.raises(PartialError, match="above the limit"):
        decode(wire, _accept, max_bytes=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_with_a_partial_error_only(data: bytes) -> None:
    for payload in (data, MAGIC + data, MAGIC + struct.pack("<I", max(0, len(data) - 70)) + data):
        try:
            decode(payload, _accept)
        except PartialError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.floats(1e-6, 1e9), st.lists(st.text("abc-1", min_size=1, max_size=20), min_size=1, max_size=30, unique=True))
def test_groups_round_trip(base: int, weight: float, ids: list[str]) -> None:
    p = Partial("s1", 7, 0.0, (Group(base, weight, len(ids), tuple(ids), b"frame"),))
    assert decode(p.encode(_sign), _accept) == p


def test_a_partial_ack_that_is_forged_malformed_or_oversized_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from compression.keys import ed25519_verifier
    from compression.partial import PartialAck

    key = Ed25519PrivateKey.generate()
    verify = ed25519_verifier(key.public_key())
    ack = PartialAck("site-a", "site-a-000000000001", "applied", 3)
    assert PartialAck.decode(ack.encode(key.sign), verify) == ack
    with pytest.raises(PartialError, match="does not verify"):
        PartialAck.decode(ack.encode(Ed25519PrivateKey.generate().sign), verify)
    with pytest.raises(PartialError, match="other fields or outcomes"):
        PartialAck.decode(replace_outcome(ack.encode(key.sign), "rejected"), verify)
    with pytest.raises(PartialError, match="malformed"):
        PartialAck.decode(b"{not json", verify)
    with pytest.raises(PartialError, match="too long"):
        PartialAck.decode(b" " * 5000, verify)


def replace_outcome(payload: bytes, outcome: str) -> bytes:
    import json

    obj = json.loads(payload)
    obj["ack"]["outcome"] = outcome
    return json.dumps(obj).encode()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_ack_bytes_are_refused_with_a_partial_error_only(data: bytes) -> None:
    from compression.partial import PartialAck

    try:
        PartialAck.decode(data, lambda sig, msg: True)
    except PartialError:
        pass
