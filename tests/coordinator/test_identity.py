"""The identity check of updates, against the registry in a real SQLite store."""

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from compression import protocol
from compression.protocol import UpdateHeader
from coordinator.errors import Rejection
from coordinator.identity import Verifier, new_key
from coordinator.store import Store


def _envelope(device: str, seq: int, key_pem: bytes | None) -> protocol.Envelope:
    frame = b"frame bytes"
    header = UpdateHeader(device, seq, f"{device}-{seq}", 0, 1, 0.0, hashlib.sha256(frame).hexdigest())
    signer = serialization.load_pem_private_key(key_pem, password=None).sign if key_pem else None  # type: ignore[union-attr]
    return protocol.decode_signed_envelope(protocol.encode_envelope(header, frame, signer=signer))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path, create=True)


def test_enrolled_devices_must_sign_with_their_own_key(store: Store) -> None:
    pem, public = new_key()
    other_pem, _ = new_key()
    store.enroll("pi-1", public)
    v = Verifier(store, allow_unknown=True, require_signatures=False)
    assert v.check(_envelope("pi-1", 1, pem)) is True
    for env, reason in ((_envelope("pi-1", 2, None), "unsigned"), (_envelope("pi-1", 2, other_pem), "bad_signature")):
        with pytest.raises(Rejection) as err:
            v.check(env)
        assert err.value.reason == reason
    store.advance_seq("pi-1", 5)
    with pytest.raises(Rejection, match="replayed"):
        v.check(_envelope("pi-1", 5, pem))
    assert v.check(_envelope("pi-1", 6, pem))
    store.revoke("pi-1")
    with pytest.raises(Rejection, match="revoked"):
        v.check(_envelope("pi-1", 7, pem))
    store.enroll("pi-1", new_key()[1])  # re-enrolled with a new key: the old one no longer verifies
    with pytest.raises(Rejection, match="bad_signature"):
        v.check(_envelope("pi-1", 8, pem))


def test_devices_that_were_never_enrolled(store: Store) -> None:
    pem, _ = new_key()
    with pytest.raises(Rejection, match="unknown_key"):
        Verifier(store, allow_unknown=True, require_signatures=False).check(_envelope("stranger", 1, pem))
    assert Verifier(store, allow_unknown=True, require_signatures=False).check(_envelope("lab", 1, None)) is False
    with pytest.raises(Rejection, match="unsigned"):
        Verifier(store, allow_unknown=True, require_signatures=True).check(_envelope("lab", 1, None))
    with pytest.raises(Rejection, match="unknown_device"):
        Verifier(store, allow_unknown=False, require_signatures=False).check(_envelope("lab", 1, None))


def test_a_signed_envelope_round_trips_and_the_signature_covers_the_header() -> None:
    pem, public = new_key()
    env = _envelope("pi-1", 3, pem)
    assert env.signature is not None and len(env.signature) == 64
    assert env.signed.startswith(protocol.SIGNING_CONTEXT) and b'"seq":3' in env.signed
