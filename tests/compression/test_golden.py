"""Golden wire vectors: frames written by earlier releases must keep decoding to the same values."""

import json
from pathlib import Path

import numpy as np
import pytest

from compression import FrameKind, decode_frame, protocol

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.bin"))


def test_golden_vectors_exist() -> None:
    assert {"update_v1_fp32", "update_v1_fp16", "update_v1_int8", "snapshot_v1_fp32", "envelope_v1"} <= set(CASES)
    assert {"update_v2_int8_bitpack", "update_v2_fp16_varint", "update_v2_sign_bitpack", "update_v3_int4_varint"} <= set(CASES)
    assert {"envelope_v2_signed", "envelope_v2_signed_base"} <= set(CASES)
    assert {"update_v2_sign_varint_rotating", "update_v2_int8_varint_support"} <= set(CASES)


def test_the_signed_golden_envelope_still_verifies() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    env = protocol.decode_signed_envelope((GOLDEN / "envelope_v2_signed.bin").read_bytes())
    assert env.signature is not None
    Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().verify(env.signature, env.signed)


def test_the_golden_envelope_with_a_base_hash_still_verifies_and_names_its_base() -> None:
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    env = protocol.decode_signed_envelope((GOLDEN / "envelope_v2_signed_base.bin").read_bytes())
    assert env.header.base_sha256 == hashlib.sha256(b"base weights").hexdigest() and env.signature is not None
    Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().verify(env.signature, env.signed)


def test_the_golden_partial_still_decodes_and_verifies() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from compression.keys import ed25519_verifier
    from compression.partial import decode

    verify = ed25519_verifier(Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key())
    p = decode((GOLDEN / "partial_v1.bin").read_bytes(), lambda site: verify)
    assert (p.partial_id, p.updates, [g.base_version for g in p.groups]) == ("site-a-000000000003", 3, [4, 5])
    assert p.groups[0].update_ids == ("pi-1-7", "pi-2-9") and p.groups[1].weight == 16.0
    expected = json.loads((GOLDEN / "partial_v1.json").read_text())["tensors"]
    for i, g in enumerate(p.groups):
        for key, values in decode_frame(g.frame).dense().items():
            np.testing.assert_array_equal(values, np.asarray(expected[f"group{i}/{key}"], dtype=np.float32))


@pytest.mark.parametrize("name", [c for c in CASES if not c.startswith("partial")])
def test_golden_vector_decodes_to_recorded_values(name: str) -> None:
    data = (GOLDEN / f"{name}.bin").read_bytes()
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    if name.startswith("envelope"):
        header, data = protocol.decode_envelope(data)
        assert (header.device, header.seq, header.base_version) == ("pi-1", 7, 3)
    frame = decode_frame(data)
    assert frame.kind is (FrameKind.SNAPSHOT if name.startswith("snapshot") else FrameKind.UPDATE)
    dense = frame.dense()
    assert sorted(dense) == sorted(expected["tensors"])
    for key, values in expected["tensors"].items():
        np.testing.assert_array_equal(dense[key], np.asarray(values, dtype=np.float32))
