"""A site's partial aggregate, on the wire: what a site aggregator forwards to the root.

A partial covers device updates that the site accepted and recorded. They are grouped by the
global version each one was trained on, so that the root still weights them by staleness. A
group holds the **weighted sum** of its updates' deltas (each weighted by its sample count),
the **weight** (the sum of those counts), how many updates it covers and their ids. The
root turns a group into one update of delta ``sum / weight`` and ``weight`` samples, which
is exactly what FedBuff's sample-weighted mean would have given those updates one by one.

    b"FPA1" | u32 header length | header (canonical JSON) | u32 group count
            | per group: u32 frame length | frame (compress_dense of the weighted sum, FrameKind.UPDATE)
            | Ed25519 signature (64 bytes) over CONTEXT + everything before it

Header: ``site``, ``partial_id`` (``<site>-<seq>``, the root deduplicates by it), ``seq``,
``created`` and ``groups``: per group ``base_version``, ``weight``, ``count``,
``update_ids``. Signed by the site aggregator's enrolled key. Every length is checked against
the payload before anything is allocated; frames are decoded by the caller with its own
:class:`~compression.frame.FrameLimits`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from compression.errors import ProtocolError
from compression.protocol import Signer, check_id

MAGIC = b"FPA1"
CONTEXT = b"fedge partial v1\x00"
SIGNATURE = 64
MAX_HEADER = 8 << 20
MAX_GROUPS = 256
MAX_UPDATES = 100_000
"""Update ids one partial may cover, in all."""
_U32 = struct.Struct("<I")


class PartialError(ProtocolError):
    """A partial is malformed, out of bounds, or its signature does not verify."""


@dataclass(frozen=True)
class Group:
    base_version: int
    weight: float
    """The sum of the covered updates' sample counts (their weights in the sum)."""
    count: int
    update_ids: tuple[str, ...]
    frame: bytes
    """The weighted sum of the covered deltas, a lossless fp32 frame."""


@dataclass(frozen=True)
class Partial:
    site: str
    seq: int
    created: float
    groups: tuple[Group, ...]

    @property
    def partial_id(self) -> str:
        return f"{self.site}-{self.seq:012d}"

    @property
    def updates(self) -> int:
        return sum(g.count for g in self.groups)

    def encode(self, signer: Signer) -> bytes:
        head = {
            "site": self.site,
            "partial_id": self.partial_id,
            "seq": self.seq,
            "created": self.created,
            "groups": [
                {"base_version": g.base_version, "weight": g.weight, "count": g.count, "update_ids": list(g.update_ids)}
                for g in self.groups
            ],
        }
        header = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
        parts = [MAGIC, _U32.pack(len(header)), header, _U32.pack(len(self.groups))]
        for g in self.groups:
            parts += [_U32.pack(len(g.frame)), g.frame]
        unsigned = b"".join(parts)
        signature = signer(CONTEXT + unsigned)
        if len(signature) != SIGNATURE:
            raise PartialError(f"an Ed25519 signature is {SIGNATURE} bytes, the signer gave {len(signature)}")
        return unsigned + signature


def decode(payload: bytes, verify: Callable[[str], Callable[[bytes, bytes], bool]], max_bytes: int = 256 << 20) -> Partial:
    """Parse and verify a partial; ``verify(site)`` gives the check of that site's key (it raises if none)."""
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise PartialError(f"a partial of {len(payload)} bytes is above the limit of {max_bytes}")
    if len(payload) < len(MAGIC) + 8 + SIGNATURE or payload[:4] != MAGIC:
        raise PartialError("not a partial aggregate (bad magic or too short)")
    body, signature = payload[:-SIGNATURE], payload[-SIGNATURE:]
    pos = 4
    (hlen,) = _U32.unpack_from(body, pos)
    pos += 4
    if hlen > MAX_HEADER or pos + hlen + 4 > len(body):
        raise PartialError(f"a partial's header of {hlen} bytes does not fit its {len(body)} bytes")
    try:
        head = json.loads(body[pos : pos + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PartialError("a partial's header is not JSON") from None
    pos += hlen
    if not isinstance(head, dict) or set(head) != {"site", "partial_id", "seq", "created", "groups"}:
        raise PartialError("a partial's header must hold exactly site, partial_id, seq, created and groups")
    try:
        site = check_id(head["site"], "site id")
    except ProtocolError as exc:
        raise PartialError(str(exc)) from None
    seq, created = head["seq"], head["created"]
    if type(seq) is not int or not 0 < seq < 1 << 62:
        raise PartialError(f"partial seq must be a positive integer, got {seq!r}")
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
        raise PartialError("partial 'created' must be a finite number")
    if head["partial_id"] != f"{site}-{seq:012d}":
        raise PartialError(f"partial id {head['partial_id']!r} is not {site}-<seq>")
    if not verify(site)(signature, CONTEXT + body):
        raise PartialError(f"the signature on partial {head['partial_id']} does not verify (forged, tampered, or another key)")
    metas = head["groups"]
    if not isinstance(metas, list) or not 0 < len(metas) <= MAX_GROUPS:
        raise PartialError(f"a partial holds 1..{MAX_GROUPS} groups")
    (count,) = _U32.unpack_from(body, pos)
    pos += 4
    if count != len(metas):
        raise PartialError(f"a partial's header names {len(metas)} groups and its body {count}")
    groups: list[Group] = []
    seen: set[str] = set()
    total = 0
    for i, m in enumerate(metas):
        group = _group(m, i)
        if pos + 4 > len(body):
            raise PartialError(f"partial group {i}: the body ends before its frame")
        (flen,) = _U32.unpack_from(body, pos)
        pos += 4
        if pos + flen > len(body):
            raise PartialError(f"partial group {i}: a frame of {flen} bytes does not fit")
        total += group[2]
        if total > MAX_UPDATES or seen & set(group[3]) or len(set(group[3])) != len(group[3]):
            raise PartialError(f"partial group {i}: update ids repeat, or more than {MAX_UPDATES} in all")
        seen |= set(group[3])
        groups.append(Group(*group, frame=body[pos : pos + flen]))
        pos += flen
    if pos != len(body):
        raise PartialError(f"a partial has {len(body) - pos} bytes after its last group")
    return Partial(site, seq, float(created), tuple(groups))


def _group(m: object, i: int) -> tuple[int, float, int, tuple[str, ...]]:
    if not isinstance(m, dict) or set(m) != {"base_version", "weight", "count", "update_ids"}:
        raise PartialError(f"partial group {i} must hold exactly base_version, weight, count and update_ids")
    base, weight, count, ids = m["base_version"], m["weight"], m["count"], m["update_ids"]
    if type(base) is not int or base < 0:
        raise PartialError(f"partial group {i}: base_version must be a non-negative integer")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not (math.isfinite(weight) and weight > 0):
        raise PartialError(f"partial group {i}: weight must be a positive finite number")
    if type(count) is not int or not 0 < count <= MAX_UPDATES:
        raise PartialError(f"partial group {i}: count must be in 1..{MAX_UPDATES}")
    if not isinstance(ids, list) or len(ids) != count or any(not isinstance(u, str) or not 0 < len(u) <= 128 for u in ids):
        raise PartialError(f"partial group {i}: update_ids must list exactly count ids of 1..128 characters")
    return base, float(weight), count, tuple(ids)


ACK_CONTEXT = b"fedge partial ack v1\x00"


@dataclass(frozen=True)
class PartialAck:
    """The root's acknowledgement of a partial, after its commit: ``applied`` now, or ``duplicate``
    (committed before). Signed by the fleet key; retained on ``fl/<fleet>/sites/<site>/ack``."""

    site: str
    partial_id: str
    outcome: str
    version: int

    def _body(self) -> bytes:
        obj = {"site": self.site, "partial_id": self.partial_id, "outcome": self.outcome, "version": self.version}
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()

    def encode(self, signer: Signer) -> bytes:
        return json.dumps({"ack": json.loads(self._body()), "signature": signer(ACK_CONTEXT + self._body()).hex()}).encode()

    @classmethod
    def decode(cls, payload: bytes, verify: Callable[[bytes, bytes], bool]) -> PartialAck:
        if len(payload) > 4096:
            raise PartialError(f"a partial ack of {len(payload)} bytes is too long")
        try:
            obj = json.loads(bytes(payload).decode("utf-8"))
            a, sig = obj["ack"], bytes.fromhex(obj["signature"])
            ack = cls(check_id(a["site"], "site id"), str(a["partial_id"])[:128], str(a["outcome"]), int(a["version"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, ProtocolError) as exc:
            raise PartialError(f"a partial ack is malformed: {exc}") from None
        if ack.outcome not in ("applied", "duplicate") or ack._body() != json.dumps(a, separators=(",", ":"), sort_keys=True).encode():
            raise PartialError("a partial ack holds other fields or outcomes than applied and duplicate")
        if not verify(sig, ACK_CONTEXT + ack._body()):
            raise PartialError(f"the fleet key's signature on the ack of {ack.partial_id} does not verify")
        return ack
