"""Why an update is refused: one table of stable codes for the coordinator, its metrics and ledger,
and the devices that hear them in their acks.

A code is counted (``fedge_updates_rejected_total{reason=...}``), stored in the rejections
table, and sent to the device in its signed ack as ``"<code>: <detail>"``.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Rejection codes. The value is what goes on the wire and into the database."""

    MALFORMED = "malformed"
    MALFORMED_FRAME = "malformed_frame"
    MALFORMED_MESSAGE = "malformed_message"
    MALFORMED_TOPIC = "malformed_topic"
    BAD_CHECKSUM = "bad_checksum"
    TOO_LARGE = "too_large"
    NON_FINITE = "non_finite"
    SHAPE_MISMATCH = "shape_mismatch"
    WRONG_BASE = "wrong_base"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_MISMATCH = "device_mismatch"
    REVOKED = "revoked"
    REPLAYED = "replayed"
    DUPLICATE = "duplicate"
    FUTURE_VERSION = "future_version"
    TOO_STALE = "too_stale"
    NORM_BOUND = "norm_bound"
    RATE_LIMITED = "rate_limited"
    ONE_PER_BUFFER = "one_per_buffer"
    ONE_PER_ROUND = "one_per_round"
    PRIVACY_BUDGET = "privacy_budget"
    NOT_INVITED = "not_invited"
    SECAGG = "secagg"
    BACKLOG = "backlog"
    HANDLER_ERROR = "handler_error"

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


MEANINGS: dict[Reason, str] = {
    Reason.MALFORMED: "the bytes are not acceptable to the codec",
    Reason.MALFORMED_FRAME: "the frame is malformed: magic, version, lengths, counts, dtypes or indices",
    Reason.MALFORMED_MESSAGE: "the envelope or message is malformed",
    Reason.MALFORMED_TOPIC: "the topic names no valid device id",
    Reason.BAD_CHECKSUM: "the frame's checksum does not match",
    Reason.TOO_LARGE: "the message or a decoded size exceeds a limit",
    Reason.NON_FINITE: "a value (or the step it would make) is NaN or infinite",
    Reason.SHAPE_MISMATCH: "a tensor is not part of the global state, or has another shape",
    Reason.WRONG_BASE: "the update declares another base model (by the content hash of its weights) than the fleet's",
    Reason.UNSIGNED: "the update carries no signature, and the fleet requires one",
    Reason.BAD_SIGNATURE: "the signature does not verify",
    Reason.UNKNOWN_KEY: "the device has no enrolled key",
    Reason.UNKNOWN_DEVICE: "the device is not enrolled or admitted",
    Reason.DEVICE_MISMATCH: "the envelope names another device than its topic",
    Reason.REVOKED: "the device was revoked",
    Reason.REPLAYED: "the sequence number was already used",
    Reason.DUPLICATE: "the update id was already processed",
    Reason.FUTURE_VERSION: "the base version is newer than the current one",
    Reason.TOO_STALE: "the base version is older than max_staleness (or round_late) allows",
    Reason.NORM_BOUND: "the update's norm exceeds the bound",
    Reason.RATE_LIMITED: "the device sends more updates a minute than allowed",
    Reason.ONE_PER_BUFFER: "the device already has an update in this DP buffer",
    Reason.ONE_PER_ROUND: "the device already has an update in this FedAvg round",
    Reason.PRIVACY_BUDGET: "the device (or fleet) has spent its privacy budget",
    Reason.NOT_INVITED: "the fleet trains in cohorts and the device has no open invitation for this update's cohort",
    Reason.SECAGG: "a secure-aggregation message is malformed, forged, out of turn, or not from a member of its cohort",
    Reason.BACKLOG: "a site aggregator cannot reach its root: its partials wait for acks and its buffer is full; send it again later",
    Reason.HANDLER_ERROR: "handling the message failed; it was quarantined",
}


def reason_code(reason: Reason | str) -> str:
    """The stable code of ``reason``; raises ``ValueError`` for a code not in the table."""
    return Reason(reason).value
