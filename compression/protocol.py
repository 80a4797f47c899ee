"""The MQTT protocol shared by agents and the coordinator: topics and message schemas.

Topic names are built only here (see ``docs/wire-format.md``)::

    fl/<fleet>/global/meta              coord -> all     JSON, retained
    fl/<fleet>/global/snapshot          coord -> all     frame, retained
    fl/<fleet>/global/delta             coord -> all     frame, retained
    fl/<fleet>/devices/<id>/update      device -> coord  envelope + frame
    fl/<fleet>/devices/<id>/status      device -> all    JSON, retained, LWT offline
    fl/<fleet>/devices/<id>/cmd         coord -> device  JSON
    fl/<fleet>/devices/<id>/ack         coord -> device  JSON, retained, signed: the last update processed
    fl/<fleet>/coordinator/status       coord -> all     JSON, retained, LWT offline
    fl/<fleet>/cohorts/<c>/invite/<id>  coord -> device  JSON, signed: train one round for cohort <c>
    fl/<fleet>/cohorts/<c>/secagg/<id>  coord -> device  binary, fleet-signed: secure aggregation's rounds
    fl/<fleet>/devices/<id>/secagg      device -> coord  binary, device-signed: secure aggregation's rounds
    fl/<fleet>/sites/<site>/partial     site -> root     binary, site-signed: a partial aggregate
    fl/<fleet>/sites/<site>/ack         root -> site     JSON, retained, fleet-signed: the last partial committed
    fl/<fleet>/sites/<site>/status      site -> root     JSON, retained: the site's coordinator/status (bridge remap)
    fl/<fleet>/sites/<site>/bridge      site broker      "1"/"0", retained: the bridge's notification (its will)
    fl/<fleet>/root/coordinator/status  root -> site     JSON, retained: the root's status on a site broker (remap)

The global meta and every ack carry an Ed25519 signature by the fleet key (the meta names
the sha256 of the delta and the snapshot, so it binds them too). Signing and verifying
go through callables, so that this package needs no key material and no crypto library.

Every parser here validates its input completely and raises
:class:`~compression.errors.ProtocolError` naming the bad field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from compression.errors import LimitError, ProtocolError
from compression.reasons import Reason

PROTOCOL_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEVICE_STATES = ("starting", "waiting", "training", "idle", "paused", "offline")
COMMANDS = ("pause", "resume")
MAX_JSON_BYTES = 64 << 10


def check_id(value: str, what: str) -> str:
    """Validate a fleet or device id: 1-64 of ``[A-Za-z0-9_.-]``, no MQTT wildcards or slashes."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"{what} {value!r} must be 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")
    return value


# --- topics -----------------------------------------------------------------------------


def global_meta(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/global/meta"


def global_snapshot(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/global/snapshot"


def global_delta(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/global/delta"


def device_update(fleet: str, device: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/devices/{check_id(device, 'device id')}/update"


def device_status(fleet: str, device: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/devices/{check_id(device, 'device id')}/status"


def device_cmd(fleet: str, device: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/devices/{check_id(device, 'device id')}/cmd"


def device_ack(fleet: str, device: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/devices/{check_id(device, 'device id')}/ack"


def coordinator_status(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/coordinator/status"


def cohort_invite(fleet: str, cohort: str, device: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/cohorts/{check_id(cohort, 'cohort id')}/invite/{check_id(device, 'device id')}"


def cohort_secagg(fleet: str, cohort: str, device: str) -> str:
    """The coordinator's secure-aggregation messages to one member of ``cohort``."""
    return f"fl/{check_id(fleet, 'fleet')}/cohorts/{check_id(cohort, 'cohort id')}/secagg/{check_id(device, 'device id')}"


def device_secagg_inbox(fleet: str, device: str) -> str:
    """Subscription filter for every secure-aggregation message to ``device``."""
    return f"fl/{check_id(fleet, 'fleet')}/cohorts/+/secagg/{check_id(device, 'device id')}"


def device_secagg(fleet: str, device: str) -> str:
    """A device's secure-aggregation messages to the coordinator."""
    return f"fl/{check_id(fleet, 'fleet')}/devices/{check_id(device, 'device id')}/secagg"


def site_partial(fleet: str, site: str) -> str:
    """A site aggregator's partial aggregates to the root."""
    return f"fl/{check_id(fleet, 'fleet')}/sites/{check_id(site, 'site id')}/partial"


def site_ack(fleet: str, site: str) -> str:
    """The root's acknowledgements of a site's partials (retained: the last one)."""
    return f"fl/{check_id(fleet, 'fleet')}/sites/{check_id(site, 'site id')}/ack"


def site_bridge(fleet: str, site: str) -> str:
    """The site broker's bridge notification: retained ``1`` while connected, ``0`` (its will) after."""
    return f"fl/{check_id(fleet, 'fleet')}/sites/{check_id(site, 'site id')}/bridge"


def all_site_status(fleet: str) -> str:
    """Every site aggregator's status at the root: its ``coordinator/status``, remapped by the bridge."""
    return f"fl/{check_id(fleet, 'fleet')}/sites/+/status"


def all_site_bridges(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/sites/+/bridge"


def all_partials(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/sites/+/partial"


MAX_SITE_STATUS = 65536
"""Bytes of a site's status that anyone reading it parses; a larger one is ignored."""


def bridge_state(payload: bytes) -> bool | None:
    """Mosquitto's bridge notification: True for ``1`` (connected), False for ``0``, None for anything else."""
    return {b"1": True, b"0": False}.get(bytes(payload).strip())


def site_status_object(payload: bytes) -> dict[str, Any] | None:
    """A site's status as a JSON object of at most :data:`MAX_SITE_STATUS` bytes, else None.
    Its values are the site's word: readers check each field's type before they use it."""
    if len(payload) > MAX_SITE_STATUS:
        return None
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def parse_site_topic(topic: str) -> tuple[str, str, str]:
    """Split ``fl/<fleet>/sites/<site>/<leaf>`` into ``(fleet, site, leaf)``."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "fl" or parts[2] != "sites":
        raise ProtocolError(f"topic {topic!r} is not fl/<fleet>/sites/<site>/<leaf>")
    return check_id(parts[1], "fleet"), check_id(parts[3], "site id"), parts[4]


def all_secagg(fleet: str) -> str:
    return f"fl/{check_id(fleet, 'fleet')}/devices/+/secagg"


def device_invites(fleet: str, device: str) -> str:
    """Subscription filter for every invitation to ``device``."""
    return f"fl/{check_id(fleet, 'fleet')}/cohorts/+/invite/{check_id(device, 'device id')}"


def all_updates(fleet: str) -> str:
    """Subscription filter for every device's updates."""
    return f"fl/{check_id(fleet, 'fleet')}/devices/+/update"


def all_device_status(fleet: str) -> str:
    """Subscription filter for every device's status."""
    return f"fl/{check_id(fleet, 'fleet')}/devices/+/status"


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """Split ``fl/<fleet>/devices/<id>/<leaf>`` into ``(fleet, device, leaf)``."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "fl" or parts[2] != "devices":
        raise ProtocolError(f"topic {topic!r} is not fl/<fleet>/devices/<id>/<leaf>")
    return check_id(parts[1], "fleet"), check_id(parts[3], "device id"), parts[4]


# --- JSON helpers -----------------------------------------------------------------------


def _load_json_object(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_JSON_BYTES:
        raise LimitError(f"{what} is {len(payload)} bytes, above {MAX_JSON_BYTES}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _int(obj: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{what}: {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(obj: dict[str, Any], key: str, what: str, optional: bool = False) -> float | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ProtocolError(f"{what}: {key!r} must be a finite number, got {v!r}")
    return float(v)


def _str(obj: dict[str, Any], key: str, what: str, max_len: int = 256) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_len:
        raise ProtocolError(f"{what}: {key!r} must be a non-empty string of at most {max_len} characters, got {v!r}")
    return v


# --- signed JSON (global meta, acks) ---------------------------------------------------

Signer = Callable[[bytes], bytes]
"""Bytes to sign -> signature (the fleet key's ``sign``)."""
Verifier = Callable[[bytes, bytes], bool]
"""``(signature, message) -> valid`` (the fleet's public key)."""

META_CONTEXT = b"fedge global meta v1\x00"
ACK_CONTEXT = b"fedge ack v1\x00"
INVITE_CONTEXT = b"fedge cohort invite v1\x00"


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _signed_message(context: bytes, obj: dict[str, Any]) -> bytes:
    return context + _canonical({k: v for k, v in obj.items() if k != "signature"})


def _check_signature(obj: dict[str, Any], context: bytes, verify: Verifier | None, what: str) -> str:
    """The object's hex signature; with ``verify``, it must be present and valid."""
    sig = obj.get("signature", "")
    if not isinstance(sig, str) or (sig and not re.fullmatch(r"[0-9a-f]{2,256}", sig)):
        raise ProtocolError(f"{what}: 'signature' must be hex, got {sig!r}")
    if verify is None:
        return sig
    if not sig:
        raise SignatureError(f"{what} is not signed by the fleet key")
    if not verify(bytes.fromhex(sig), _signed_message(context, obj)):
        raise SignatureError(f"{what}: the fleet key's signature does not verify (forged or tampered)")
    return sig


def _signed_object(
    payload: bytes, fields: Mapping[str, Any], context: bytes, verify: Verifier | None, what: str
) -> tuple[dict[str, Any], str]:
    """A JSON object with no field outside ``fields``, and its signature (checked with ``verify``)."""
    obj = _load_json_object(payload, what)
    unknown = set(obj) - set(fields)
    if unknown:
        raise ProtocolError(f"{what}: unknown fields {sorted(unknown)}")
    return obj, _check_signature(obj, context, verify, what)


class SignatureError(ProtocolError):
    """A global message is unsigned, or its signature does not verify against the fleet key."""

    reason = Reason.BAD_SIGNATURE.value


# --- update envelope --------------------------------------------------------------------

ENVELOPE_MAGIC = b"FEV1"
"""Unsigned envelopes (still decoded; a coordinator that requires signatures rejects them)."""
SIGNED_ENVELOPE_MAGIC = b"FEV2"
"""Signed envelopes: ``FEV2 | u32 header length | header JSON | u8 signature length | signature | frame``."""
_ENV_HEAD = struct.Struct("<4sI")
MAX_ENVELOPE_HEADER = 4096
MAX_SIGNATURE = 128
SIGNING_CONTEXT = b"fedge update v1\x00"
"""Prefix of every signed message, so that a signature over an update can never be replayed as anything else."""


@dataclass(frozen=True)
class UpdateHeader:
    """What a device says about an update, alongside the frame."""

    device: str
    seq: int
    """Per-device monotonic sequence number."""
    update_id: str
    """Unique id, so that a redelivered update is applied once."""
    base_version: int
    """The global version the device trained from."""
    num_samples: int
    timestamp: float
    frame_sha256: str
    train_loss: float | None = None
    cohort: str = ""
    """The cohort whose invitation this update answers (empty: the fleet does not train in cohorts)."""
    base_sha256: str = ""
    """The content hash of the base model the device trained on (:mod:`compression.basehash`);
    empty from devices that do not declare it."""


def header_bytes(header: UpdateHeader) -> bytes:
    """The canonical JSON of a header: what goes on the wire and what is signed. An empty
    ``cohort`` or ``base_sha256`` is left out, so that headers without one are what they always were."""
    obj = asdict(header)
    for optional in ("cohort", "base_sha256"):
        if not obj[optional]:
            del obj[optional]
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def signing_message(head: bytes) -> bytes:
    """The bytes a device signs: a context prefix and the canonical header, which names the
    device, its sequence number, the base version, the time and the frame's sha256."""
    return SIGNING_CONTEXT + head


def encode_envelope(header: UpdateHeader, frame: bytes, signer: Callable[[bytes], bytes] | None = None) -> bytes:
    """``FEV1 | u32 header length | header JSON | frame``, or with ``signer`` (bytes to sign ->
    signature) the signed ``FEV2`` envelope."""
    if hashlib.sha256(frame).hexdigest() != header.frame_sha256:
        raise ProtocolError("envelope header's frame_sha256 does not match the frame")
    head = header_bytes(header)
    if signer is None:
        return _ENV_HEAD.pack(ENVELOPE_MAGIC, len(head)) + head + frame
    signature = signer(signing_message(head))
    if not 1 <= len(signature) <= MAX_SIGNATURE:
        raise ProtocolError(f"signature of {len(signature)} bytes; expected 1..{MAX_SIGNATURE}")
    return _ENV_HEAD.pack(SIGNED_ENVELOPE_MAGIC, len(head)) + head + bytes([len(signature)]) + signature + frame


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope: the header, the signature (None if unsigned), the signed bytes, the frame."""

    header: UpdateHeader
    signature: bytes | None
    signed: bytes
    frame: bytes


def decode_envelope(payload: bytes, max_bytes: int = 64 << 20) -> tuple[UpdateHeader, bytes]:
    """Split and validate an update envelope; returns the header and the (undecoded) frame."""
    env = decode_signed_envelope(payload, max_bytes)
    return env.header, env.frame


def decode_signed_envelope(payload: bytes, max_bytes: int = 64 << 20) -> Envelope:
    """Split and validate an envelope, signed (``FEV2``) or not (``FEV1``). The signature is
    returned, not checked: checking needs the device's key, which only the coordinator has."""
    if len(payload) > max_bytes:
        raise LimitError(f"update is {len(payload)} bytes, above the limit of {max_bytes}")
    if len(payload) < _ENV_HEAD.size:
        raise ProtocolError(f"update is {len(payload)} bytes, too short for an envelope")
    magic, head_len = _ENV_HEAD.unpack_from(payload)
    if magic not in (ENVELOPE_MAGIC, SIGNED_ENVELOPE_MAGIC):
        raise ProtocolError(f"bad envelope magic {bytes(magic)!r}; expected {ENVELOPE_MAGIC!r} or {SIGNED_ENVELOPE_MAGIC!r}")
    if head_len > MAX_ENVELOPE_HEADER or _ENV_HEAD.size + head_len > len(payload):
        raise ProtocolError(f"envelope header length {head_len} is out of bounds")
    head = bytes(payload[_ENV_HEAD.size : _ENV_HEAD.size + head_len])
    rest = _ENV_HEAD.size + head_len
    signature: bytes | None = None
    if magic == SIGNED_ENVELOPE_MAGIC:
        if rest >= len(payload):
            raise ProtocolError("signed envelope ends before its signature")
        sig_len = payload[rest]
        if not 1 <= sig_len <= MAX_SIGNATURE or rest + 1 + sig_len > len(payload):
            raise ProtocolError(f"signature length {sig_len} is out of bounds")
        signature = bytes(payload[rest + 1 : rest + 1 + sig_len])
        rest += 1 + sig_len
    obj = _load_json_object(head, "envelope header")
    what = "envelope header"
    unknown = set(obj) - {f for f in UpdateHeader.__dataclass_fields__}
    if unknown:
        raise ProtocolError(f"{what}: unknown fields {sorted(unknown)}")
    sha = _hex64(obj, "frame_sha256", what)
    header = UpdateHeader(
        device=check_id(_str(obj, "device", what, 64), "device id"),
        seq=_int(obj, "seq", what),
        update_id=_str(obj, "update_id", what, 128),
        base_version=_int(obj, "base_version", what),
        num_samples=_int(obj, "num_samples", what, 0, 1 << 40),
        timestamp=_float(obj, "timestamp", what) or 0.0,
        frame_sha256=sha,
        train_loss=_float(obj, "train_loss", what, optional=True),
        cohort=check_id(_str(obj, "cohort", what, 64), "cohort id") if "cohort" in obj else "",
        base_sha256=_hex64(obj, "base_sha256", what) if "base_sha256" in obj else "",
    )
    frame = bytes(payload[rest:])
    if hashlib.sha256(frame).hexdigest() != sha:
        raise ProtocolError("frame does not match the envelope's frame_sha256")
    return Envelope(header=header, signature=signature, signed=signing_message(head), frame=frame)


# --- global meta ------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalMeta:
    """Retained description of the current global version.

    A device holding version ``delta_base_version`` applies the retained delta frame
    (sha256 ``delta_sha256``) with :func:`compression.apply_delta` and must then hold a state
    whose :func:`compression.state_digest` is ``state_sha256``. Any other device takes the
    retained snapshot (sha256 ``snapshot_sha256``).
    """

    version: int
    snapshot_sha256: str
    snapshot_bytes: int
    created: float
    state_sha256: str = ""
    delta_base_version: int | None = None
    delta_sha256: str | None = None
    delta_bytes: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    """The trainable spec: model id, tier, LoRA rank/alpha/targets. Agents must match it."""
    protocol: int = PROTOCOL_VERSION
    cohorts: bool = False
    """Devices train only when invited to a cohort (``fl/<fleet>/cohorts/<c>/invite/<id>``)."""
    signature: str = ""
    """Hex Ed25519 signature by the fleet key over every other field (empty: unsigned, lab only)."""

    def _fields(self) -> dict[str, Any]:
        obj = asdict(self)
        if not obj["cohorts"]:
            del obj["cohorts"]  # what a meta was before cohorts, byte for byte
        return obj

    def to_json(self) -> bytes:
        return _canonical(self._fields())

    def signed(self, signer: Signer) -> GlobalMeta:
        """This meta with the fleet key's signature."""
        return replace(self, signature=signer(_signed_message(META_CONTEXT, self._fields())).hex())

    @classmethod
    def from_json(cls, payload: bytes, verify: Verifier | None = None) -> GlobalMeta:
        """Parse a meta; with ``verify`` (the fleet's public key) refuse it unless the fleet key signed it."""
        what = "global meta"
        obj = _load_json_object(payload, what)
        signature = _check_signature(obj, META_CONTEXT, verify, what)
        protocol = _int(obj, "protocol", what)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(f"{what}: protocol {protocol} is not supported (this side speaks {PROTOCOL_VERSION})")
        model = obj.get("model", {})
        if not isinstance(model, dict):
            raise ProtocolError(f"{what}: 'model' must be an object")
        version = _int(obj, "version", what)
        has_delta = obj.get("delta_base_version") is not None
        delta_base = _int(obj, "delta_base_version", what) if has_delta else None
        if delta_base is not None and delta_base >= version:
            raise ProtocolError(f"{what}: delta_base_version {delta_base} must be below version {version}")
        return cls(
            version=version,
            snapshot_sha256=_hex64(obj, "snapshot_sha256", what),
            snapshot_bytes=_int(obj, "snapshot_bytes", what),
            created=_float(obj, "created", what) or 0.0,
            state_sha256=_hex64(obj, "state_sha256", what),
            delta_base_version=delta_base,
            delta_sha256=_hex64(obj, "delta_sha256", what) if has_delta else None,
            delta_bytes=_int(obj, "delta_bytes", what) if has_delta else None,
            model=model,
            protocol=protocol,
            cohorts=_bool(obj, "cohorts", what),
            signature=signature,
        )


def _bool(obj: dict[str, Any], key: str, what: str) -> bool:
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise ProtocolError(f"{what}: {key!r} must be true or false, got {v!r}")
    return v


@dataclass(frozen=True)
class UpdateAck:
    """The coordinator's end-to-end acknowledgement of a device's update, retained per device.

    A broker's PUBACK only says the broker took a message; this says the coordinator
    durably applied, buffered or refused it. The agent keeps an update in its outbox
    until an ack names its ``update_id``.
    """

    device: str
    seq: int
    update_id: str
    outcome: str
    """``applied``, ``buffered`` (durably waiting for aggregation) or ``rejected``."""
    reason: str | None = None
    """The rejection reason code and detail, for ``rejected``."""
    version: int = 0
    """The coordinator's global version when it processed the update."""
    ts: float = 0.0
    signature: str = ""

    OUTCOMES = ("applied", "buffered", "rejected")

    def _fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}  # scalars only: asdict's deep copy costs more (one ack an update)

    def to_json(self) -> bytes:
        return _canonical(self._fields())

    def signed(self, signer: Signer) -> UpdateAck:
        return replace(self, signature=signer(_signed_message(ACK_CONTEXT, self._fields())).hex())

    @classmethod
    def from_json(cls, payload: bytes, verify: Verifier | None = None) -> UpdateAck:
        what = "update ack"
        obj, signature = _signed_object(payload, cls.__dataclass_fields__, ACK_CONTEXT, verify, what)
        outcome = obj.get("outcome")
        if outcome not in cls.OUTCOMES:
            raise ProtocolError(f"{what}: 'outcome' must be one of {cls.OUTCOMES}, got {outcome!r}")
        reason = obj.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 600):
            raise ProtocolError(f"{what}: 'reason' must be a string of at most 600 characters")
        return cls(
            device=check_id(_str(obj, "device", what, 64), "device id"),
            seq=_int(obj, "seq", what),
            update_id=_str(obj, "update_id", what, 128),
            outcome=str(outcome),
            reason=reason,
            version=_int(obj, "version", what),
            ts=_float(obj, "ts", what) or 0.0,
            signature=signature,
        )


@dataclass(frozen=True)
class SecAggParams:
    """What an invitation to a securely aggregated cohort tells its member (``docs/secure-aggregation.md``)."""

    position: int
    """The member's position, 1..n (members sorted by device id)."""
    n: int
    t: int
    """Threshold: the sum is recovered when at least ``t`` members answer every round."""
    clip: float
    """Every sent value is clipped to ``[-clip, clip]``."""
    bits: int
    """Bits per quantized value; the ring adds ``ceil(log2 n)`` (:class:`compression.secagg.Quantizer`)."""
    k: int
    """Coordinates every member sends: ``shared_indices(seed, trainable size, k)``."""
    seed: str
    """The cohort's 32-byte seed (hex) that picks the shared coordinates."""
    l2_clip: float = 0.0
    """Distributed DP: the L2 bound of the values a member sends (0: none)."""
    mu: float = 0.0
    """Distributed DP: each member adds Skellam(mu) noise to every quantized value (0: none)."""

    @classmethod
    def from_obj(cls, obj: Any, what: str) -> SecAggParams:
        what = f"{what}: secagg"
        if not isinstance(obj, dict) or set(obj) != set(cls.__dataclass_fields__):
            raise ProtocolError(f"{what} must be an object with exactly the fields {sorted(cls.__dataclass_fields__)}")
        n = _int(obj, "n", what, 2, 1000)
        clip = _float(obj, "clip", what) or 0.0
        if not 0 < clip <= 1e6:
            raise ProtocolError(f"{what}: 'clip' must be in (0, 1e6], got {clip}")
        return cls(
            position=_int(obj, "position", what, 1, n),
            n=n,
            t=_int(obj, "t", what, 2, n),
            clip=clip,
            bits=_int(obj, "bits", what, 2, 31),
            k=_int(obj, "k", what, 1, 1 << 26),
            seed=_hex64(obj, "seed", what),
            l2_clip=_nonnegative(obj, "l2_clip", what, 1e6),
            mu=_nonnegative(obj, "mu", what, 2.0**60),
        )


def _nonnegative(obj: dict[str, Any], key: str, what: str, hi: float) -> float:
    v = _float(obj, key, what) or 0.0
    if not 0.0 <= v <= hi:
        raise ProtocolError(f"{what}: {key!r} must be in [0, {hi:g}], got {v}")
    return v


@dataclass(frozen=True)
class CohortInvite:
    """The coordinator's invitation to one device: train one round on ``version`` (or a later
    version it holds) for ``cohort``, and upload it before ``deadline`` (Unix time). Signed by
    the fleet key; a device acts on an invitation only once. With ``secagg``, the cohort is
    securely aggregated: the device runs the rounds of ``docs/secure-aggregation.md`` instead of
    uploading its update."""

    cohort: str
    device: str
    version: int
    deadline: float
    issued: float
    signature: str = ""
    secagg: SecAggParams | None = None

    def _obj(self) -> dict[str, Any]:
        obj = asdict(self)
        if self.secagg is None:
            del obj["secagg"]  # what an invitation was before secure aggregation, byte for byte
        return obj

    def to_json(self) -> bytes:
        return _canonical(self._obj())

    def signed(self, signer: Signer) -> CohortInvite:
        return replace(self, signature=signer(_signed_message(INVITE_CONTEXT, self._obj())).hex())

    @classmethod
    def from_json(cls, payload: bytes, verify: Verifier | None = None) -> CohortInvite:
        what = "cohort invitation"
        obj, signature = _signed_object(payload, cls.__dataclass_fields__, INVITE_CONTEXT, verify, what)
        deadline = _float(obj, "deadline", what) or 0.0
        issued = _float(obj, "issued", what) or 0.0
        if deadline < issued:
            raise ProtocolError(f"{what}: deadline {deadline} is before issued {issued}")
        return cls(
            cohort=check_id(_str(obj, "cohort", what, 64), "cohort id"),
            device=check_id(_str(obj, "device", what, 64), "device id"),
            version=_int(obj, "version", what),
            deadline=deadline,
            issued=issued,
            signature=signature,
            secagg=SecAggParams.from_obj(obj["secagg"], what) if "secagg" in obj else None,
        )


def _hex64(obj: dict[str, Any], key: str, what: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ProtocolError(f"{what}: {key!r} must be 64 lowercase hex digits, got {v!r}")
    return v


# --- device status and commands ---------------------------------------------------------


@dataclass(frozen=True)
class DeviceStatus:
    """Retained heartbeat of a device. The Last Will is the same with ``state='offline'``."""

    state: str
    version: int | None = None
    ts: float | None = None
    profile: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tier: str | None = None
    """``lora`` or ``embedding`` (absent from agents older than the embedding tier)."""
    detail: str | None = None
    """Why the device is not training, when it says (a refused global spec, a schedule, a full outbox)."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> DeviceStatus:
        what = "device status"
        obj = _load_json_object(payload, what)
        state = obj.get("state")
        if state not in DEVICE_STATES:
            raise ProtocolError(f"{what}: 'state' must be one of {DEVICE_STATES}, got {state!r}")
        version = None if obj.get("version") is None else _int(obj, "version", what)
        ts = _float(obj, "ts", what, optional=True)
        profile = obj.get("profile")
        if profile is not None and not isinstance(profile, str):
            raise ProtocolError(f"{what}: 'profile' must be a string")
        raw = obj.get("metrics", {})
        if not isinstance(raw, dict):
            raise ProtocolError(f"{what}: 'metrics' must be an object")
        metrics: dict[str, float] = {}
        for k, v in raw.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                metrics[str(k)[:64]] = float(v)
            elif v is not None:
                raise ProtocolError(f"{what}: metric {k!r} must be a finite number, got {v!r}")
        tier = obj.get("tier")
        if tier is not None and tier not in ("lora", "embedding"):
            raise ProtocolError(f"{what}: 'tier' must be 'lora' or 'embedding', got {tier!r}")
        detail = obj.get("detail")
        if detail is not None and (not isinstance(detail, str) or len(detail) > 500):
            raise ProtocolError(f"{what}: 'detail' must be a string of at most 500 characters")
        return cls(state=state, version=version, ts=ts, profile=profile, metrics=metrics, tier=tier, detail=detail)


def encode_command(command: str) -> bytes:
    if command not in COMMANDS:
        raise ProtocolError(f"command must be one of {COMMANDS}, got {command!r}")
    return json.dumps({"cmd": command}).encode()


def decode_command(payload: bytes) -> str:
    obj = _load_json_object(payload, "command")
    command = obj.get("cmd")
    if command not in COMMANDS:
        raise ProtocolError(f"command: 'cmd' must be one of {COMMANDS}, got {command!r}")
    return str(command)


# --- the trainable spec carried in global meta ------------------------------------------


EMBED_DELTA = "embed_tokens.delta"
"""Name of the input-embedding delta table in the global state of a fleet with an embedding tier."""


@dataclass(frozen=True)
class TrainableSpec:
    """What the fleet trains on which base. The coordinator is authoritative; agents must match it.

    The global state always holds the LoRA adapters. With ``embedding`` it also holds
    :data:`EMBED_DELTA`, a ``[vocab, hidden]`` table added to the frozen input embedding
    (the output head stays the base's), which devices of the ``embedding`` tier train
    row by row. Each device sends only the tensors of its own tier.
    """

    tier: str = "lora"
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    base: dict[str, Any] = field(default_factory=dict)
    """Fingerprint of the base model: model_type, vocab_size, hidden_size, num_hidden_layers,
    and ``sha256``, the content hash of its weights (:mod:`compression.basehash`; fleets made
    before it have none)."""

    @property
    def base_sha256(self) -> str:
        value = self.base.get("sha256")
        return value if isinstance(value, str) else ""

    embedding: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> TrainableSpec:
        what = "trainable spec"
        if obj.get("tier") != "lora":
            raise ProtocolError(f"{what}: 'tier' must be 'lora', got {obj.get('tier')!r}")
        targets = obj.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ProtocolError(f"{what}: 'targets' must be a non-empty list of module names, got {targets!r}")
        base = obj.get("base", {})
        if not isinstance(base, dict):
            raise ProtocolError(f"{what}: 'base' must be an object")
        if "sha256" in base:
            _hex64(base, "sha256", f"{what} base")
        embedding = obj.get("embedding", False)
        if not isinstance(embedding, bool):
            raise ProtocolError(f"{what}: 'embedding' must be true or false, got {embedding!r}")
        return cls(
            tier="lora",
            r=_int(obj, "r", what, 1, 1024),
            alpha=_int(obj, "alpha", what, 1, 1 << 16),
            targets=tuple(targets),
            base=base,
            embedding=embedding,
        )
