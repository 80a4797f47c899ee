"""Cohort invitations on the wire and on the device: the signed message, the parser under
arbitrary input, the header's cohort field, and acting on each invitation once."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import protocol
from compression.errors import CodecError, ProtocolError
from compression.invitations import LATE_GRACE_S, Invitations
from compression.keys import ed25519_verifier
from compression.protocol import CohortInvite, GlobalMeta, SignatureError, UpdateHeader

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


_verify = ed25519_verifier(PUB)


INVITE = CohortInvite("c00000001", "dev-a", 3, 1_000_060.0, 1_000_000.0)


def test_an_invitation_round_trips_signed_and_a_forged_one_is_refused() -> None:
    signed = INVITE.signed(KEY.sign)
    assert CohortInvite.from_json(signed.to_json(), _verify) == signed
    forged = json.loads(signed.to_json())
    forged["version"] = 4
    with pytest.raises(SignatureError):
        CohortInvite.from_json(json.dumps(forged).encode(), _verify)
    with pytest.raises(SignatureError, match="not signed"):
        CohortInvite.from_json(INVITE.to_json(), _verify)
    assert protocol.cohort_invite("home", "c00000001", "dev-a") == "fl/home/cohorts/c00000001/invite/dev-a"
    assert protocol.device_invites("home", "dev-a") == "fl/home/cohorts/+/invite/dev-a"
    with pytest.raises(ProtocolError, match="cohort id"):
        protocol.cohort_invite("home", "c/#", "dev-a")


def test_bad_invitations_name_the_field() -> None:
    obj = json.loads(INVITE.to_json())
    for key, value, match in [
        ("version", -1, "'version'"),
        ("deadline", "soon", "'deadline'"),
        ("deadline", 10.0, "before issued"),
        ("cohort", "a b", "cohort id"),
        ("extra", 1, "unknown fields"),
    ]:
        bad = {**obj, key: value}
        with pytest.raises(ProtocolError, match=match):
            CohortInvite.from_json(json.dumps(bad).encode())


_FIELDS = st.sampled_from([*CohortInvite.__dataclass_fields__, "x"])
_VALUES = st.none() | st.integers() | st.floats() | st.text(max_size=70) | st.booleans()
_OBJECTS = st.dictionaries(_FIELDS, _VALUES).map(lambda d: json.dumps(d).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | _OBJECTS)
def test_the_invitation_parser_only_ever_raises_codec_errors(payload: bytes) -> None:
    try:
        CohortInvite.from_json(payload)
    except CodecError:
        pass


def test_a_header_without_a_cohort_is_what_it_always_was() -> None:
    header = UpdateHeader("dev-a", 1, "u1", 0, 4, 0.0, hashlib.sha256(b"f").hexdigest())
    assert b"cohort" not in protocol.header_bytes(header)
    envelope = protocol.encode_envelope(UpdateHeader(**{**header.__dict__, "cohort": "c00000002"}), b"f")
    assert protocol.decode_envelope(envelope)[0].cohort == "c00000002"
    assert protocol.decode_envelope(protocol.encode_envelope(header, b"f"))[0].cohort == ""


def test_a_meta_without_cohorts_is_byte_for_byte_what_it_was() -> None:
    meta = GlobalMeta(1, "0" * 64, 10, 0.0, "1" * 64)
    assert b"cohorts" not in meta.to_json()
    on = GlobalMeta(1, "0" * 64, 10, 0.0, "1" * 64, cohorts=True).signed(KEY.sign)
    assert GlobalMeta.from_json(on.to_json(), _verify).cohorts is True
    with pytest.raises(ProtocolError, match="'cohorts'"):
        GlobalMeta.from_json(json.dumps({**json.loads(meta.to_json()), "cohorts": "yes"}).encode())


def test_a_device_acts_on_each_invitation_once_and_keeps_its_own_deadline() -> None:
    inv = Invitations("dev-a")
    wall = INVITE.issued + 1_000.0  # the device's clock is 1,000 s ahead: the length of the window counts, not the clock
    assert inv.offer(INVITE, mono=50.0, wall=INVITE.deadline + LATE_GRACE_S - 1) is None
    assert inv.current(109.9) == INVITE
    assert "already taken" in (inv.offer(INVITE, 60.0, wall) or "")
    assert inv.used() == "c00000001" and inv.current(60.0) is None
    assert "already taken" in (inv.offer(INVITE, 61.0, wall) or "")
    late = CohortInvite("c00000002", "dev-a", 3, 1_000_060.0, 1_000_000.0)
    assert "deadline passed" in (inv.offer(late, 70.0, INVITE.deadline + LATE_GRACE_S + 1) or "")
    fresh = CohortInvite("c00000003", "dev-a", 4, 2_000_060.0, 2_000_000.0)
    assert inv.offer(fresh, mono=100.0, wall=2_000_000.0) is None
    assert inv.current(160.0) is None  # 60 s after it arrived: past its window, dropped
    assert inv.used() == ""
    with pytest.raises(ProtocolError, match="not this one"):
        inv.offer(CohortInvite("c00000004", "dev-b", 4, 10.0, 0.0), 0.0, 0.0)
