"""Topics and message schemas shared by agents and the coordinator."""

import hashlib
import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compression import CodecError, protocol
from compression.errors import ProtocolError
from compression.protocol import DeviceStatus, GlobalMeta, TrainableSpec, UpdateHeader


def test_topics_follow_the_design() -> None:
    assert protocol.device_update("f", "pi-1") == "fl/f/devices/pi-1/update"
    assert protocol.global_meta("f") == "fl/f/global/meta"
    assert protocol.all_updates("f") == "fl/f/devices/+/update"
    assert protocol.parse_device_topic("fl/f/devices/pi-1/status") == ("f", "pi-1", "status")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "-lead"])
def test_ids_with_wildcards_or_slashes_are_rejected(bad: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.device_update("f", bad)


def _header(frame: bytes, **kw) -> UpdateHeader:  # type: ignore[no-untyped-def]
    base = dict(
        device="d1",
        seq=3,
        update_id="u",
        base_version=2,
        num_samples=8,
        timestamp=1.5,
        frame_sha256=hashlib.sha256(frame).hexdigest(),
        train_loss=2.0,
    )
    base.update(kw)
    return UpdateHeader(**base)


def test_envelope_round_trip() -> None:
    frame = b"FEDG-frame-bytes"
    header, got = protocol.decode_envelope(protocol.encode_envelope(_header(frame), frame))
    assert got == frame and header == _header(frame)


def test_the_base_hash_round_trips_and_a_header_without_one_is_what_it_always_was() -> None:
    frame = b"frame"
    with_base = _header(frame, base_sha256="0f" * 32)
    header, _ = protocol.decode_envelope(protocol.encode_envelope(with_base, frame))
    assert header.base_sha256 == "0f" * 32
    assert b"base_sha256" not in protocol.header_bytes(_header(frame)) and b"cohort" not in protocol.header_bytes(_header(frame))
    head = json.loads(protocol.header_bytes(with_base))
    for bad in ("0F" * 32, "ab", 7):
        raw = json.dumps({**head, "base_sha256": bad}).encode()
        with pytest.raises(ProtocolError, match="base_sha256"):
            protocol.decode_envelope(protocol.ENVELOPE_MAGIC + len(raw).to_bytes(4, "little") + raw + frame)


def test_a_spec_with_a_malformed_base_hash_is_refused() -> None:
    spec = TrainableSpec(base={"model_type": "llama", "sha256": "ab" * 32})
    assert TrainableSpec.from_dict(spec.to_dict()).base_sha256 == "ab" * 32
    assert TrainableSpec().base_sha256 == ""
    with pytest.raises(ProtocolError, match="sha256"):
        TrainableSpec.from_dict({**spec.to_dict(), "base": {"sha256": "x" * 64}})


def test_the_base_hash_covers_a_gguf_file_or_a_directory_s_weight_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from compression.basehash import base_sha256

    (tmp_path / "m.gguf").write_bytes(b"GGUF weights")
    assert base_sha256(tmp_path / "m.gguf") == hashlib.sha256(b"GGUF weights").hexdigest()
    d = tmp_path / "dir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert base_sha256(d) is None  # a config alone has no weights to hash
    (d / "model-00001.safetensors").write_bytes(b"one")
    first = base_sha256(d)
    (d / "tokenizer.json").write_text("{}")  # not a weight file
    assert base_sha256(d) == first
    (d / "model-00001.safetensors").write_bytes(b"One")
    assert base_sha256(d) != first


def test_envelope_detects_a_swapped_frame() -> None:
    env = protocol.encode_envelope(_header(b"one"), b"one")
    with pytest.raises(ProtocolError, match="frame_sha256"):
        protocol.decode_envelope(env[:-3] + b"two")


@pytest.mark.parametrize("field, value", [("seq", -1), ("seq", "1"), ("device", "a/b"), ("base_version", 1.5), ("timestamp", float("nan"))])
def test_envelope_header_fields_are_validated(field: str, value: object) -> None:
    frame = b"x"
    head = json.loads(json.dumps({**_header(frame).__dict__}))
    head[field] = value
    raw = json.dumps(head).encode()
    env = protocol.ENVELOPE_MAGIC + len(raw).to_bytes(4, "little") + raw + frame
    with pytest.raises(ProtocolError, match=field):
        protocol.decode_envelope(env)


def test_meta_and_status_round_trip() -> None:
    meta = GlobalMeta(version=4, snapshot_sha256="ab" * 32, snapshot_bytes=10, created=1.0, state_sha256="cd" * 32, model={"tier": "lora"})
    assert GlobalMeta.from_json(meta.to_json()) == meta
    with_delta = GlobalMeta(
        version=4,
        snapshot_sha256="ab" * 32,
        snapshot_bytes=10,
        created=1.0,
        state_sha256="cd" * 32,
        delta_base_version=3,
        delta_sha256="ef" * 32,
        delta_bytes=5,
    )
    assert GlobalMeta.from_json(with_delta.to_json()) == with_delta
    bad = json.loads(with_delta.to_json())
    bad["delta_base_version"] = 4
    with pytest.raises(ProtocolError, match="delta_base_version"):
        GlobalMeta.from_json(json.dumps(bad).encode())
    status = DeviceStatus(state="training", version=4, ts=2.0, profile="laptop", metrics={"eval_loss": 1.5})
    assert DeviceStatus.from_json(status.to_json()) == status


def test_status_rejects_unknown_state_and_bad_metrics() -> None:
    with pytest.raises(ProtocolError, match="state"):
        DeviceStatus.from_json(b'{"state": "dancing"}')
    with pytest.raises(ProtocolError, match="metric"):
        DeviceStatus.from_json(b'{"state": "idle", "metrics": {"x": "high"}}')


def test_spec_round_trip_and_validation() -> None:
    spec = TrainableSpec(r=4, alpha=8, targets=("q_proj",), base={"model_type": "llama"})
    assert TrainableSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ProtocolError, match="targets"):
        TrainableSpec.from_dict({**spec.to_dict(), "targets": []})


def test_commands() -> None:
    assert protocol.decode_command(protocol.encode_command("pause")) == "pause"
    with pytest.raises(ProtocolError):
        protocol.decode_command(b'{"cmd": "reboot"}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parsers_raise_codec_errors_only(payload: bytes) -> None:
    for parse in (GlobalMeta.from_json, DeviceStatus.from_json, protocol.decode_command, protocol.decode_envelope):
        try:
            parse(payload)
        except CodecError:
            pass


@given(st.dictionaries(st.sampled_from(["state", "version", "ts", "profile", "metrics"]), json_values))
def test_status_parser_on_near_valid_objects(obj: dict) -> None:
    try:
        DeviceStatus.from_json(json.dumps(obj).encode())
    except CodecError:
        pass


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    payload = b"[" * 60000 + b"]" * 60000
    with pytest.raises(CodecError):
        DeviceStatus.from_json(payload[:60000])
    with pytest.raises(ProtocolError, match="nested too deeply"):
        DeviceStatus.from_json(b'{"metrics": ' + b"[" * 30000 + b"]" * 30000 + b"}")


def _keys():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from compression.keys import ed25519_verifier

    key = Ed25519PrivateKey.generate()
    return key, ed25519_verifier(key.public_key())


def test_signed_meta_and_ack_round_trip_and_refuse_tampering() -> None:
    from compression.protocol import SignatureError, UpdateAck

    key, verify = _keys()
    meta = GlobalMeta(version=4, snapshot_sha256="ab" * 32, snapshot_bytes=10, created=1.0, state_sha256="cd" * 32).signed(key.sign)
    assert GlobalMeta.from_json(meta.to_json(), verify) == meta
    ack = UpdateAck("pi-1", 3, "u-3", "rejected", "norm_bound: too big", 7, 2.0).signed(key.sign)
    assert UpdateAck.from_json(ack.to_json(), verify) == ack
    for payload in (meta.to_json(), ack.to_json()):
        doc = json.loads(payload)
        doc["version"] = doc["version"] + 1
        with pytest.raises(SignatureError):
            (GlobalMeta if "snapshot_sha256" in doc else UpdateAck).from_json(json.dumps(doc).encode(), verify)  # type: ignore[attr-defined]
    with pytest.raises(SignatureError, match="not signed"):
        GlobalMeta.from_json(replace(meta, signature="").to_json(), verify)
    other, _ = _keys()
    with pytest.raises(SignatureError):
        UpdateAck.from_json(UpdateAck("pi-1", 3, "u-3", "applied").signed(other.sign).to_json(), verify)


@given(st.binary(max_size=600))
def test_the_ack_parser_raises_only_codec_errors(payload: bytes) -> None:
    from compression.protocol import UpdateAck

    _, verify = _keys()
    for v in (None, verify):
        try:
            UpdateAck.from_json(payload, v)
        except CodecError:
            pass


@given(
    st.dictionaries(
        st.sampled_from(["device", "seq", "update_id", "outcome", "reason", "version", "ts", "signature", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.floats(), st.booleans()),
    )
)
def test_ack_objects_of_any_shape_raise_only_codec_errors(doc: dict) -> None:  # type: ignore[type-arg]
    from compression.protocol import UpdateAck

    try:
        UpdateAck.from_json(json.dumps(doc).encode())
    except CodecError:
        pass
