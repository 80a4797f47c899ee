"""Secure aggregation's messages on the wire: signed binary frames, and their typed bodies.

Every message, either way, is ::

    b"FSA1" | u32 header length | u32 body length | header (canonical JSON) | body | Ed25519 signature (64 bytes)

signed over ``CONTEXT`` followed by everything before the signature. A device signs with its
enrolled key (on ``fl/<fleet>/devices/<id>/secagg``); the coordinator signs with the fleet key
(on ``fl/<fleet>/cohorts/<c>/secagg/<id>``). The header names the ``kind``, the ``cohort``
and the ``device`` (the sender, or the member addressed), so that a signed message cannot
be replayed into another cohort or to another device. Bodies are fixed-size records whose
count the length must match exactly; nothing is allocated before its size is checked.

Kinds, device to coordinator: ``keys`` (its two X25519 public keys), ``shares`` (its
sealed shares, one per member), ``masked`` (its packed masked vector), ``reveal`` (its
shares for the unmasking), ``refuse`` (why it will not answer). Coordinator to device:
``keys`` (every member's public keys), ``shares`` (the sealed shares addressed to it),
``unmask`` (the survivors and the dropouts). The protocol itself is
:mod:`compression.secagg`; the device's side of the rounds is :mod:`compression.secagg_device`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compression.protocol import Signer, check_id
from compression.secagg import MAX_COHORT, SHARE_BYTES, Keys, Reveal, Sealed, SecAggError

MAGIC = b"FSA1"
CONTEXT = b"fedge secagg message v1\x00"
_HEAD = struct.Struct("<4sII")
SIGNATURE = 64
MAX_HEADER = 16 * 1024
MAX_BODY = 32 * 1024 * 1024
UP_KINDS = frozenset({"keys", "shares", "masked", "reveal", "refuse"})
DOWN_KINDS = frozenset({"keys", "shares", "unmask"})

_KEY_REC = struct.Struct("<H32s32s")
_SEALED_REC = struct.Struct(f"<H12s{2 * SHARE_BYTES + 16}s")
_SHARE_REC = struct.Struct(f"<H{SHARE_BYTES}s")


@dataclass(frozen=True)
class SecAggMessage:
    kind: str
    cohort: str
    device: str
    fields: dict[str, Any] = field(default_factory=dict)
    """Small typed fields of the header, by kind."""
    body: bytes = b""

    def encode(self, signer: Signer) -> bytes:
        header = json.dumps(
            {"kind": self.kind, "cohort": self.cohort, "device": self.device, **self.fields}, separators=(",", ":"), sort_keys=True
        ).encode()
        if len(header) > MAX_HEADER or len(self.body) > MAX_BODY:
            raise SecAggError(f"a secagg {self.kind} message of {len(header)} + {len(self.body)} bytes is over the bounds")
        unsigned = _HEAD.pack(MAGIC, len(header), len(self.body)) + header + self.body
        signature = signer(CONTEXT + unsigned)
        if len(signature) != SIGNATURE:
            raise SecAggError(f"an Ed25519 signature is {SIGNATURE} bytes, the signer gave {len(signature)}")
        return unsigned + signature


def decode(
    payload: bytes, verify: Callable[[str], Callable[[bytes, bytes], bool]], kinds: frozenset[str], max_body: int = MAX_BODY
) -> SecAggMessage:
    """Parse and verify one message. ``verify(device)`` gives the ``(signature, message) -> bool`` check
    for the signer of a message that names ``device`` (it raises if there is none)."""
    payload = bytes(payload)
    if len(payload) < _HEAD.size + SIGNATURE:
        raise SecAggError(f"a secagg message of {len(payload)} bytes is shorter than its frame")
    magic, hlen, blen = _HEAD.unpack_from(payload)
    if magic != MAGIC:
        raise SecAggError(f"not a secagg message (magic {magic!r})")
    if hlen > MAX_HEADER or blen > max_body or len(payload) != _HEAD.size + hlen + blen + SIGNATURE:
        raise SecAggError(
            f"a secagg message claims a {hlen}-byte header and a {blen}-byte body in {len(payload)} bytes (bounds {MAX_HEADER}, {max_body})"
        )
    try:
        head = json.loads(payload[_HEAD.size : _HEAD.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SecAggError("a secagg message's header is not JSON") from None
    if not isinstance(head, dict):
        raise SecAggError("a secagg message's header is not a JSON object")
    kind, cohort, device = head.pop("kind", None), head.pop("cohort", None), head.pop("device", None)
    if not isinstance(kind, str) or kind not in kinds:
        raise SecAggError(f"secagg message kind {kind!r} is not one of {sorted(kinds)}")
    try:
        check_id(cohort, "cohort id")
        check_id(device, "device id")
    except Exception as exc:  # noqa: BLE001 - ProtocolError, named as this message's fault
        raise SecAggError(f"a secagg {kind} message: {exc}") from None
    signed = payload[:-SIGNATURE]
    if not verify(device)(payload[-SIGNATURE:], CONTEXT + signed):
        raise SecAggError(f"the signature on a secagg {kind} message naming {device!r} does not verify (forged or tampered)")
    return SecAggMessage(kind, cohort, device, head, payload[_HEAD.size + hlen : -SIGNATURE])


# -- typed fields and bodies ----------------------------------------------------------------


def _int_field(msg: SecAggMessage, key: str, lo: int, hi: int) -> int:
    v = msg.fields.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SecAggError(f"secagg {msg.kind}: {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _records(body: bytes, rec: struct.Struct, what: str) -> list[tuple[Any, ...]]:
    if len(body) % rec.size or len(body) // rec.size > MAX_COHORT:
        raise SecAggError(f"{what}: {len(body)} bytes are not at most {MAX_COHORT} records of {rec.size}")
    return list(rec.iter_unpack(body))


def _positions(values: Any, n: int, what: str) -> list[int]:
    if (
        not isinstance(values, list)
        or len(values) > n
        or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= n for v in values)
    ):
        raise SecAggError(f"{what} must be a list of member positions in 1..{n}")
    if len(set(values)) != len(values):
        raise SecAggError(f"{what} names a member twice")
    return sorted(values)


def keys_up(cohort: str, device: str, keys: Keys) -> SecAggMessage:
    return SecAggMessage("keys", cohort, device, {"position": keys.index, "c_pk": keys.c_pk.hex(), "s_pk": keys.s_pk.hex()})


def read_keys_up(msg: SecAggMessage, n: int) -> Keys:
    try:
        c_pk, s_pk = bytes.fromhex(msg.fields["c_pk"]), bytes.fromhex(msg.fields["s_pk"])
    except (KeyError, TypeError, ValueError):
        raise SecAggError("secagg keys: 'c_pk' and 's_pk' must be hex") from None
    if len(c_pk) != 32 or len(s_pk) != 32:
        raise SecAggError("secagg keys: an X25519 public key is 32 bytes")
    return Keys(_int_field(msg, "position", 1, n), c_pk, s_pk)


def keys_down(cohort: str, device: str, keys: list[Keys], n: int, t: int) -> SecAggMessage:
    body = b"".join(_KEY_REC.pack(k.index, k.c_pk, k.s_pk) for k in sorted(keys, key=lambda k: k.index))
    return SecAggMessage("keys", cohort, device, {"n": n, "t": t}, body)


def read_keys_down(msg: SecAggMessage, n: int) -> list[Keys]:
    out = [Keys(i, c, s) for i, c, s in _records(msg.body, _KEY_REC, "secagg keys")]
    _positions([k.index for k in out], n, "secagg keys")
    return out


def shares_msg(cohort: str, device: str, sealed: list[Sealed], *, up: bool) -> SecAggMessage:
    """Up: a device's sealed shares (keyed by receiver). Down: those addressed to ``device`` (keyed by sender)."""
    body = b"".join(_SEALED_REC.pack(m.receiver if up else m.sender, m.nonce, m.box) for m in sealed)
    return SecAggMessage("shares", cohort, device, {}, body)


def read_shares(msg: SecAggMessage, own: int, n: int, *, up: bool) -> list[Sealed]:
    """Up: ``own`` is the sender's position; down: the receiver's."""
    recs = _records(msg.body, _SEALED_REC, "secagg shares")
    _positions([r[0] for r in recs], n, "secagg shares")
    return [Sealed(own, p, nonce, box) if up else Sealed(p, own, nonce, box) for p, nonce, box in recs]


def masked_up(cohort: str, device: str, packed: bytes, values: int, ring_bits: int) -> SecAggMessage:
    return SecAggMessage("masked", cohort, device, {"values": values, "ring_bits": ring_bits}, packed)


def unmask_down(cohort: str, device: str, survivors: list[int], dropped: list[int]) -> SecAggMessage:
    return SecAggMessage("unmask", cohort, device, {"survivors": survivors, "dropped": dropped})


def read_unmask(msg: SecAggMessage, n: int) -> tuple[list[int], list[int]]:
    return _positions(msg.fields.get("survivors"), n, "secagg unmask: survivors"), _positions(
        msg.fields.get("dropped"), n, "secagg unmask: dropped"
    )


def reveal_up(cohort: str, device: str, reveal: Reveal) -> SecAggMessage:
    b = b"".join(_SHARE_REC.pack(i, v.to_bytes(SHARE_BYTES, "big")) for i, v in sorted(reveal.b_shares.items()))
    s = b"".join(_SHARE_REC.pack(i, v.to_bytes(SHARE_BYTES, "big")) for i, v in sorted(reveal.s_shares.items()))
    return SecAggMessage("reveal", cohort, device, {"position": reveal.index, "b_count": len(reveal.b_shares)}, b + s)


def read_reveal(msg: SecAggMessage, n: int) -> Reveal:
    index = _int_field(msg, "position", 1, n)
    recs = _records(msg.body, _SHARE_REC, "secagg reveal")
    nb = _int_field(msg, "b_count", 0, len(recs))
    b, s = recs[:nb], recs[nb:]
    _positions([r[0] for r in b], n, "secagg reveal: b shares")
    _positions([r[0] for r in s], n, "secagg reveal: s shares")
    if {r[0] for r in b} & {r[0] for r in s}:
        raise SecAggError("secagg reveal: both kinds of share of one member")
    return Reveal(index, {i: int.from_bytes(v, "big") for i, v in b}, {i: int.from_bytes(v, "big") for i, v in s})


def refuse_up(cohort: str, device: str, why: str) -> SecAggMessage:
    return SecAggMessage("refuse", cohort, device, {"why": why[:300]})
