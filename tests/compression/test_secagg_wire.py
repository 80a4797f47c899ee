"""Secure aggregation's wire messages: round trips, and hostile bytes (hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.secagg import Keys, Reveal, Sealed, SecAggError
from compression.secagg_wire import (
    DOWN_KINDS,
    MAGIC,
    UP_KINDS,
    decode,
    keys_down,
    read_keys_down,
    read_reveal,
    read_shares,
    read_unmask,
    reveal_up,
    shares_msg,
    unmask_down,
)


def _sign(msg: bytes) -> bytes:
    return b"\x01" * 64


def _accept(device: str):  # type: ignore[no-untyped-def]
    return lambda sig, msg: sig == b"\x01" * 64


def test_every_kind_survives_the_wire() -> None:
    keys = [Keys(i, bytes([i]) * 32, bytes([i + 1]) * 32) for i in (1, 2, 3)]
    m = decode(keys_down("c1", "d1", keys, 3, 2).encode(_sign), _accept, DOWN_KINDS)
    assert read_keys_down(m, 3) == keys and m.fields == {"n": 3, "t": 2}
    sealed = [Sealed(2, r, bytes(12), bytes([r]) * 148) for r in (1, 2, 3)]
    up = decode(shares_msg("c1", "d2", sealed, up=True).encode(_sign), _accept, UP_KINDS)
    assert read_shares(up, 2, 3, up=True) == sealed
    r = Reveal(1, {1: 5, 2: 7}, {3: 2**520})
    assert read_reveal(decode(reveal_up("c1", "d1", r).encode(_sign), _accept, UP_KINDS), 3) == r
    assert read_unmask(decode(unmask_down("c1", "d1", [2, 1], [3]).encode(_sign), _accept, DOWN_KINDS), 3) == ([1, 2], [3])


def test_a_reveal_with_both_kinds_of_share_of_one_member_is_malformed() -> None:
    bad = reveal_up("c1", "d1", Reveal(1, {2: 5}, {2: 6}))
    with pytest.raises(SecAggError, match="both kinds"):
        read_reveal(decode(bad.encode(_sign), _accept, UP_KINDS), 3)


def test_kinds_signatures_ids_and_positions_are_checked() -> None:
    wire = unmask_down("c1", "d1", [1], []).encode(_sign)
    with pytest.raises(SecAggError, match="kind"):
        decode(wire, _accept, UP_KINDS)  # a coordinator's message on a device's topic
    with pytest.raises(SecAggError, match="does not verify"):
        decode(wire, lambda d: lambda s, m: False, DOWN_KINDS)
    with pytest.raises(SecAggError, match="device id"):
        decode(unmask_down("c1", "d/1", [1], []).encode(_sign), _accept, DOWN_KINDS)
    with pytest.raises(SecAggError, match="positions in 1..3"):
        read_unmask(decode(unmask_down("c1", "d1", [4], []).encode(_sign), _accept, DOWN_KINDS), 3)
    with pytest.raises(SecAggError, match="twice"):
        read_unmask(decode(unmask_down("c1", "d1", [1, 1], []).encode(_sign), _accept, DOWN_KINDS), 3)


def test_a_header_of_the_wrong_types_is_refused() -> None:
    head = b'{"kind":["keys"],"cohort":"c1","device":"d1"}'
    with pytest.raises(SecAggError, match="kind"):
        decode(struct.pack("<4sII", MAGIC, len(head), 0) + head + b"\x01" * 64, _accept, UP_KINDS)
    head = b'{"kind":"keys","cohort":7,"device":"d1"}'
    with pytest.raises(SecAggError, match="cohort id"):
        decode(struct.pack("<4sII", MAGIC, len(head), 0) + head + b"\x01" * 64, _accept, UP_KINDS)


def test_a_frame_that_claims_more_than_it_holds_is_refused_before_any_allocation() -> None:
    claim = struct.pack("<4sII", MAGIC, 10, 1 << 31) + b"x" * 80
    with pytest.raises(SecAggError, match="claims"):
        decode(claim, _accept, UP_KINDS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_with_a_secagg_error_only(data: bytes) -> None:
    for payload in (data, MAGIC + data, struct.pack("<4sII", MAGIC, len(data) // 2, max(0, len(data) - len(data) // 2 - 64)) + data):
        try:
            m = decode(payload, _accept, UP_KINDS | DOWN_KINDS)
        except SecAggError:
            continue
        for read in (read_keys_down, read_reveal, read_unmask):
            try:
                read(m, 10)
            except SecAggError:
                pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=50, unique=True), st.integers(0, 2**521 - 2))
def test_reveals_round_trip(positions: list[int], value: int) -> None:
    half = len(positions) // 2
    r = Reveal(1, {p: value for p in positions[:half]}, {p: value for p in positions[half:]})
    assert read_reveal(decode(reveal_up("c1", "d1", r).encode(_sign), _accept, UP_KINDS), 50) == r
